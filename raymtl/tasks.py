"""The one table of task specifications.

Everything task-specific (which columns to read, how to validate a label, which head and
loss to use, how to score it, how to turn a model output into a prediction) is looked up
here. Adding a task is one entry in ``TASKS``.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskSpec:
    name: str
    path: str                    # train file, relative to the data directory
    text_cols: tuple[str, ...]   # one column: single sentence; two: a sentence pair
    label_col: str
    label_type: str              # "class" (int in [0, num_labels)) or "score" (float in label_range)
    num_labels: int = 1          # classes for "class" tasks
    label_range: tuple[float, float] = (0.0, 0.0)  # inclusive range for "score" tasks
    metric: str = "accuracy"     # "accuracy" or "pearson" (see raymtl.analysis.metrics)
    default_pair_mode: str = "cross"  # "cross" ([CLS] a [SEP] b) or "bi" (SBERT features)
    id_col: str = "id"           # column of row ids ("" = none: the line number is the id)
    # the names a column has in the task's other file layout (minBERT's or GLUE's)
    other_names: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    prediction_column: str = ""  # the minBERT project's prediction-file header (predict --format minbert)

    @property
    def is_pair(self) -> bool:
        return len(self.text_cols) == 2

    def parse_label(self, raw: str) -> float | int:
        """Parse and validate one label; raises ValueError naming the problem."""
        raw = raw.strip()
        if self.label_type == "class":
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"label {raw!r} in column {self.label_col!r} is not a number") from None
            if not value.is_integer() or not 0 <= value < self.num_labels:
                raise ValueError(
                    f"label {raw!r} in column {self.label_col!r} is not one of "
                    f"{list(range(self.num_labels))}")
            return int(value)
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"score {raw!r} in column {self.label_col!r} is not a number") from None
        lo, hi = self.label_range
        if not lo <= value <= hi:
            raise ValueError(f"score {raw!r} in column {self.label_col!r} is outside [{lo}, {hi}]")
        return value


TASKS: dict[str, TaskSpec] = {
    "sst": TaskSpec(
        name="sst", path="sst/train.csv", text_cols=("sentence",), label_col="sentiment",
        label_type="class", num_labels=5, metric="accuracy",
        other_names={"id": ("index",)}, prediction_column="Predicted_Sentiment"),        # GLUE SST-2 test
    "quora": TaskSpec(
        name="quora", path="quora/train.tsv", text_cols=("question1", "question2"),
        label_col="is_duplicate", label_type="class", num_labels=2, metric="accuracy",
        default_pair_mode="bi", prediction_column="Predicted_Is_Paraphrase",
        other_names={"question1": ("sentence1",), "question2": ("sentence2",)}),   # minBERT: <blank> id sentence1 ...
    "sts": TaskSpec(
        name="sts", path="sts/train.csv", text_cols=("sentence1", "sentence2"),
        label_col="similarity", label_type="score", label_range=(0.0, 5.0), metric="pearson",
        default_pair_mode="bi", prediction_column="Predicted_Similiary",            # sic, as minBERT writes it
        other_names={"id": ("index",), "similarity": ("score",)}),                  # GLUE STS-B: index ... score
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}")
    return TASKS[name]
