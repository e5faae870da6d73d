"""The metric vocabulary against hand computations; one spelling in patching, attribution and the CLI;
tasks own their knowledge (no task name in the library; a third task works without touching it)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from probekit import attribution as A
from probekit import metrics as M
from probekit import patching as P
from probekit.corruptions import corrupt, corruption_kinds, make_pair
from probekit.tasks import Batch, MultiplicationTask, ProbekitError, SortingTask
from probekit.tasks.base import Edit, check_n, resample_rule, rng_for

# ---------------------------------------------------------------------------- hand computations

# two examples, four positions, vocabulary of three; the answer is at positions 2 and 3, so the
# logits at positions 1 and 2 are read
TOKENS = torch.tensor([[0, 1, 2, 0], [0, 2, 1, 1]])
CORR_TOKENS = torch.tensor([[0, 1, 1, 0], [0, 2, 1, 2]])
MASK = torch.tensor([[False, False, True, True]] * 2)
LOGITS = torch.tensor([
    [[9.0, 9.0, 9.0], [0.5, 1.0, 2.0], [1.5, -1.0, 0.0], [9.0, 9.0, 9.0]],
    [[9.0, 9.0, 9.0], [3.0, 0.0, 1.0], [0.0, 2.0, 0.5], [9.0, 9.0, 9.0]],
])


def _batch(tokens, labels=None):
    return Batch(tokens=tokens, answer_mask=MASK[:len(tokens)], features={}, task="toy", objective="copy", length=2,
                 prompt_len=2, pos_labels=labels)


def _hand(metric: str) -> list[list[float]]:
    """Per example, per answer step, in plain Python."""
    out = []
    for b in range(2):
        row = []
        for t in (1, 2):
            lg = LOGITS[b, t].tolist()
            c, w = int(TOKENS[b, t + 1]), int(CORR_TOKENS[b, t + 1])
            z = sum(math.exp(v) for v in lg)
            val = {"logit": lg[c], "logprob": lg[c] - math.log(z), "prob": math.exp(lg[c]) / z,
                   "margin": lg[c] - max(v for i, v in enumerate(lg) if i != c),
                   "acc": float(max(range(3), key=lambda i: lg[i]) == c), "logit-diff": lg[c] - lg[w]}[metric]
            row.append(val)
        out.append(row)
    return out


@pytest.mark.parametrize("metric", ["logit", "logprob", "prob", "margin", "acc", "logit-diff"])
def test_each_metric_by_hand(metric):
    clean, corr = _batch(TOKENS), _batch(CORR_TOKENS)
    want = torch.tensor(_hand(metric))
    got = M.metric_value(LOGITS, clean, metric, corrupted=corr, per_example=True, per_step=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(M.metric_value(LOGITS, clean, metric, corrupted=corr, per_example=True), want.mean(1))
    torch.testing.assert_close(M.metric_value(LOGITS, clean, metric, corrupted=corr), want.mean())
    torch.testing.assert_close(M.metric_value(LOGITS, clean, metric, corrupted=corr, per_step=True), want.mean(0))
    one = M.metric_value(LOGITS, clean, metric, corrupted=corr, steps=[1], per_example=True)
    torch.testing.assert_close(one, want[:, 1])


@pytest.mark.parametrize("metric", M.TOKEN_METRICS)
def test_token_metric_by_hand(metric):
    """The metric of given tokens (what interventions score a counterfactual answer with), at the read logits."""
    read = LOGITS[:, 1:3]
    got = M.token_metric(read, TOKENS[:, 2:4], metric)
    torch.testing.assert_close(got, torch.tensor(_hand(metric)))


def test_token_metric_refuses_pair_metrics():
    with pytest.raises(ProbekitError, match="unknown token metric 'logit-diff'"):
        M.token_metric(LOGITS, TOKENS, "logit-diff")


def test_exact_match_is_every_step_right():
    acc = torch.tensor(_hand("acc"))
    got = M.metric_value(LOGITS, _batch(TOKENS), "exact-match", per_example=True)
    torch.testing.assert_close(got, acc.min(1).values)
    assert acc.tolist() == [[1.0, 1.0], [0.0, 1.0]] and got.tolist() == [1.0, 0.0]  # the case tells the two apart
    with pytest.raises(ProbekitError, match="no per-step values"):
        M.metric_value(LOGITS, _batch(TOKENS), "exact-match", per_step=True)


def test_the_patching_metric_is_the_same_computation():
    """`BoundMetric` (patching's engine) and `metric_value` (attribution) agree, per step, for every metric."""
    clean, corr = _batch(TOKENS), _batch(CORR_TOKENS)
    pair = make_pair(clean, corr)
    for metric in M.METRICS:
        bm = M.BoundMetric.bind(metric, pair)
        fn = bm.tl_metric()
        torch.testing.assert_close(fn(LOGITS), M.metric_value(LOGITS, clean, metric, corrupted=corr))


@pytest.mark.parametrize("old,new", [("logit_diff", "logit-diff"), ("token_acc", "acc"), ("exact_match", "exact-match")])
def test_old_spellings_are_refused_with_the_right_one(old, new):
    with pytest.raises(ProbekitError) as e:
        M.Metric(old)
    assert f"spelled {new!r}" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ProbekitError, match=f"spelled '{new}'"):
        M.metric_value(LOGITS, _batch(TOKENS), old)
    with pytest.raises(ProbekitError, match="unknown metric 'loss'"):
        M.check_metric("loss")


def test_pair_metrics_need_a_changed_corrupted_answer():
    clean = _batch(TOKENS)
    with pytest.raises(ProbekitError, match="needs a corrupted batch"):
        M.metric_value(LOGITS, clean, "logit-diff")
    with pytest.raises(ProbekitError, match="unchanged"):
        M.metric_value(LOGITS, clean, "logit-diff", corrupted=clean)
    with pytest.raises(ProbekitError, match="identical shapes"):
        M.check_pair(clean, _batch(TOKENS[:1]))
    with pytest.raises(ProbekitError, match="out of range"):
        M.metric_value(LOGITS, clean, "prob", steps=[2])


def test_answer_layout_targets_and_digit_step():
    b = _batch(TOKENS)
    assert M.answer_layout(b).tolist() == [1, 2] and M.answer_targets(b).tolist() == [[2, 0], [1, 1]]
    for reverse in (True, False):
        task = MultiplicationTask(digits=2, b_digits=1, reverse=reverse)
        mb = task.sample(4, seed=0)
        for k in range(3):
            step = M.digit_step(mb, k)
            assert int(mb.features["digit_index"][0, M.answer_layout(mb)[step]]) == k
            assert step == (k if reverse else 2 - k)
    with pytest.raises(ProbekitError, match="mixes answer layouts"):
        M.answer_layout(replace(b, answer_mask=torch.tensor([[False, False, True, True], [False, True, True, True]])))


def test_position_labels():
    sort = SortingTask(n_values=16).sample(3, length=2, seed=0)
    assert M.position_labels(sort) == ["0 sort", "1 x0", "2 x1", "3 |", "4 y0", "5 y1"]
    hint = SortingTask(n_values=16, objective="successor").sample(3, length=2, seed=0)
    assert M.position_labels(hint, [4, 5, 6]) == ["4 q0", "5 s0", "6 q1"]
    mult = MultiplicationTask(digits=2, b_digits=1).sample(3, seed=0)
    assert M.position_labels(mult) == ["0 a1", "1 a0", "2 *", "3 b0", "4 =", "5 d0", "6 d1", "7 d2"]
    # without task labels: the token where every row has it (decoded with vocab), else a dot
    assert M.position_labels(_batch(TOKENS)) == ["0 0", "1 ·", "2 ·", "3 ·"]
    assert M.position_labels(_batch(TOKENS), [0], vocab=["A", "B", "C"]) == ["0 A"]
    assert M.position_labels(_batch(TOKENS, ("p", "q", "r", "s")), [1, 3]) == ["1 q", "3 s"]
    # a sub-batch keeps its labels; the integer position leads every label
    assert M.position_labels(sort.select([1])) == M.position_labels(sort)
    assert [int(lab.split()[0]) for lab in M.position_labels(mult)] == list(range(mult.seq_len))


# ---------------------------------------------------------------------------- one name everywhere


def test_patching_and_attribution_measure_the_same_metric(tiny_sort):
    """For each metric, patching's clean reference run equals attribution's clean metric and `metric_value`."""
    model, task = tiny_sort
    pair = corrupt(task, task.sample(8, length=5, seed=2), "successor-change", seed=1, step=2)
    with torch.no_grad():
        logits = model(pair.clean.tokens)
    for metric in ("logit-diff", "logprob", "margin", "prob"):
        pv = P.patch_values(model, pair, [P.Component("z", 0, head=0)], metric=P.Metric(metric, (2,)))
        ap = A.attribution_patching(model, pair.clean, pair.corrupted, metric=metric, exact=False, steps=[2])
        want = float(M.metric_value(logits, pair.clean, metric, corrupted=pair.corrupted, steps=[2]))
        assert pv.clean == pytest.approx(want, abs=1e-5) and ap.settings["metric_clean"] == pytest.approx(want, abs=1e-5)
    pv = P.patch_values(model, pair, [P.Component("z", 0, head=0)], metric=P.Metric("acc", (2,)))
    want = float(M.metric_value(logits, pair.clean, "acc", steps=[2]))
    assert pv.clean == pytest.approx(want)
    with pytest.raises(ProbekitError, match="unknown attribution-patching metric .*'acc'.* expected one of"):
        A.attribution_patching(model, pair.clean, pair.corrupted, metric="acc")  # no gradient
    for old in ("logit_diff", "token_acc"):
        with pytest.raises(ProbekitError, match="spelled"):
            P.sweep(model, pair, "z", metric=old)
        with pytest.raises(ProbekitError, match="spelled"):
            A.attribution_patching(model, pair.clean, pair.corrupted, metric=old)
        with pytest.raises(ProbekitError, match="spelled"):
            A.head_ablation_sweep(model, pair.clean, metric=old)


def test_cli_patch_and_attribute_take_the_same_metric_name(tiny_sort_dir, tmp_path, capsys):
    from probekit.cli import main

    common = ["--model", str(tiny_sort_dir), "--n", "8", "--length", "4"]
    assert main(["patch", *common, "--corruption", "successor-change", "--metric", "logit-diff", "--json"]) == 0
    assert main(["attribute", *common, "--method", "attrib-patch", "--metric", "logit-diff", "--exact",
                 "--out", str(tmp_path / "ap")]) == 0
    capsys.readouterr()
    for cmd in (["patch", *common, "--corruption", "successor-change", "--json"],
                ["attribute", *common, "--method", "attrib-patch", "--out", str(tmp_path / "bad")]):
        assert main([*cmd, "--metric", "logit_diff"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "'logit-diff'" in err, err


# ---------------------------------------------------------------------------- tasks own their knowledge


def test_no_task_name_outside_the_task_files():
    """No module of the library outside probekit/tasks/ names a built-in task or compares a task's name."""
    root = Path(__file__).resolve().parent.parent / "probekit"
    pattern = re.compile(r"""["'](sorting|multiplication)["']|\.task\s*[!=]=\s*["']|\.name\s*[!=]=\s*["']""")
    files = sorted(f for f in root.rglob("*.py") if "tasks" not in f.relative_to(root).parts)
    assert len(files) > 10
    hits = [f"{f.relative_to(root)}:{i}: {line.strip()}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits


@dataclass(frozen=True)
class CopyTask:
    """A third task, written here only: ``COPY x0 .. x_{L-1} | x0 .. x_{L-1}`` over values 0..n_values-1."""

    n_values: int = 8
    objective: str = "copy"
    name: str = "copy"
    objectives: tuple[str, ...] = ("copy",)

    @property
    def vocab(self) -> tuple[str, ...]:
        return tuple(str(v) for v in range(self.n_values)) + ("|", "COPY")

    @property
    def d_vocab(self) -> int:
        return self.n_values + 2

    def seq_len(self, length=None) -> int:
        return 2 + 2 * (length or 4)

    def solve(self, inputs) -> list:
        return list(inputs)

    def decode(self, tokens):
        return " ".join(self.vocab[i] for i in torch.as_tensor(tokens).tolist())

    def with_objective(self, objective):
        return self

    def spec(self) -> dict:
        return {"name": self.name, "n_values": self.n_values}

    def sample(self, n, length=None, seed=0) -> Batch:
        check_n(n)
        return self.batch_from_inputs(rng_for(seed).integers(0, self.n_values, size=(n, length or 4)))

    def batch_from_inputs(self, x) -> Batch:
        x = np.asarray(x)
        n, L = x.shape
        tokens = np.concatenate([np.full((n, 1), self.n_values + 1), x, np.full((n, 1), self.n_values), x], 1)
        mask = np.zeros_like(tokens, dtype=bool)
        mask[:, L + 2:] = True
        target = np.full_like(tokens, -1)
        target[:, L + 1:-1] = x
        labels = ("COPY", *[f"x{i}" for i in range(L)], "|", *[f"c{i}" for i in range(L)])
        return Batch(torch.from_numpy(tokens), torch.from_numpy(mask), {"target": torch.from_numpy(target)},
                     task=self.name, objective=self.objective, length=L, prompt_len=L + 2,
                     meta={"inputs": torch.from_numpy(x)}, pos_labels=labels)

    def corruptions(self):
        return {"change-one": self.change_one, "resample": resample_rule(self)}

    def change_one(self, batch, rng, index=0) -> Edit:
        x = batch.meta["inputs"].numpy().copy()
        old = x[:, index].copy()
        x[:, index] = (old + rng.integers(1, self.n_values, len(x))) % self.n_values
        return Edit(self.batch_from_inputs(x), np.ones(len(x), dtype=bool), {"old": old, "new": x[:, index]},
                    f"change-one: input {index} gets another value", answer_step=index)


def test_a_third_task_works_with_corrupt_and_patching():
    from probekit.model import ModelConfig, build_model

    task = CopyTask()
    batch = task.sample(16, length=4, seed=0)
    pair = corrupt(task, batch, "change-one", seed=3, index=1)
    assert corruption_kinds(task) == ("change-one", "resample") and pair.answer_steps == (1,)
    x, x2 = pair.clean.meta["inputs"], pair.corrupted.meta["inputs"]
    assert ((x != x2).sum(1) == 1).all() and (x[:, 1] != x2[:, 1]).all()
    again = corrupt(task, batch, "change-one", seed=3, index=1)
    assert torch.equal(again.corrupted.tokens, pair.corrupted.tokens)
    with pytest.raises(ProbekitError, match="takes options \\['index'\\], got \\['step'\\]"):
        corrupt(task, batch, "change-one", step=1)
    with pytest.raises(ProbekitError, match="not defined for task 'copy'"):
        corrupt(task, batch, "swap")
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_vocab=task.d_vocab, n_ctx=16,
                                    positional="learned", seed=0))
    res = P.sweep(model, pair, "resid_pre", by_pos=True, metric="logit-diff")
    assert res.axes == ("layer", "pos") and res.labels["pos"][:3] == ["0 COPY", "1 x0", "2 x1"]
    # layer 0, the edited input's position alone restores the clean run; positions before it change nothing
    assert float(res.values[0, 2]) == pytest.approx(1.0, abs=1e-5)
    assert res.values[0, :2].abs().max() < 1e-5
    ap = A.attribution_patching(model, pair.clean, pair.corrupted, metric="logit-diff", steps=pair.answer_steps)
    assert ap.heads.labels["pos"][:2] == ["0 COPY", "1 x0"] and ap.agreement["heads"]["k"] == 10
