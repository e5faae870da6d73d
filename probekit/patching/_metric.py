"""The metric pieces patching uses: `probekit.metrics`, the one metric vocabulary."""

from probekit.metrics import METRICS, BoundMetric, Metric, answer_layout, digit_step, position_labels

__all__ = ["METRICS", "BoundMetric", "Metric", "answer_layout", "digit_step", "position_labels"]
