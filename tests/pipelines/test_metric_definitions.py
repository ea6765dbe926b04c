"""The definition's metric regexes read exactly what the training stage prints."""

import re

from pipelines.definition import METRIC_DEFINITIONS
from steps.common.metrics import format_metrics_line


def test_each_metric_regex_reads_its_own_value_and_not_a_longer_name():
    line = format_metrics_line({"step": 40, "train_loss": 0.5, "eval_loss": 0.75,
                                "mean_tokens_per_second": 99.0, "tokens_per_second": 120.5,
                                "learning_rate": 2e-4})
    found = {name: [float(v) for v in re.findall(regex, line)]
             for name, regex in METRIC_DEFINITIONS.items()}
    assert found["train_loss"] == [0.5]
    assert found["eval_loss"] == [0.75]
    assert found["tokens_per_second"] == [120.5]
    assert found["learning_rate"] == [2e-4]
