"""The mechanism studies: each combines the three instruments on shipped models and states claims with numbers.

- `hint_study`: the successor lookup in sorting models (baseline vs hinted), by length.
- `carry_study`: the carry, causally: which head moves which operand digit in mult-5x1 (attention over chance
  as description, patching under carry-flip and column-digit as cause), where the carry is computed (DAS),
  what is readable (held-out probes with baselines), what an ablation of the carry head breaks, mult-3x3's
  circuit with its faithfulness curve, and which part transfers to unseen lengths in N x 1 models.
- `overview`: accuracy vs length for every shipped model, next to the mechanism metrics.

Each returns a `Study`: hypotheses judged from their intervals (verdicts), claims (text with the numbers in
it, and the command that regenerates them), figures, tables, a headline, and the `Result` objects behind them. ``size`` scales the sample sizes ("quick" for tests, "default"
for `probekit report`, "full" for `analyses/run_study.py`).
"""


from probekit.studies.carry import carry_study
from probekit.studies.common import SIZES, Study, StudyFigure, value_mask
from probekit.studies.hint import hint_study
from probekit.studies.overview import overview

__all__ = ["SIZES", "Study", "StudyFigure", "carry_study", "hint_study", "overview", "value_mask"]
