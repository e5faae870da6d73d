"""The mechanism studies: each combines the three instruments on shipped models and states claims with numbers.

- `hint_study`: which heads select the next value in the sorting models (chosen by patching, tested for
  necessity by mean-ablation), what the successor hint changes in them (weights, interchange interventions,
  attention by step type, probes with baselines), whether the hinted model's own lookup extrapolates, and,
  over a sweep's seeds, the hint gap and the mechanism measures of every finished seed model.
- `carry_study`: where carries are represented, used and routed in multiplication models, and what breaks
  on longer operands than trained.
- `overview`: accuracy vs length for every shipped model, and published accuracy results checked on them.
- `failure_study`: the predictive account of why the unhinted sorter fails with length, and what differs in
  the sorter that extrapolates (`studies/sorting.py`).

Each returns a `Study`: hypotheses judged from their intervals (verdicts), claims (text with the numbers in
it, and the command that regenerates them), figures, tables, a headline, and the `Result` objects behind them. ``size`` scales the sample sizes ("quick" for tests, "default"
for `probekit report`, "full" for `analyses/run_study.py`).
"""


from probekit.studies.carry import carry_study
from probekit.studies.common import SIZES, Study, StudyFigure, value_mask
from probekit.studies.hint import hint_study
from probekit.studies.overview import overview
from probekit.studies.sorting import failure_study

__all__ = ["SIZES", "Study", "StudyFigure", "carry_study", "failure_study", "hint_study", "overview", "value_mask"]
