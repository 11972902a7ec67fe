"""Related data sets: more specific data for a target task, mapped into its label space.

One table, ``RELATED``: which file(s), how to read them (a ``TaskSpec`` of the source
format, read by the same validating reader as the target tasks), and how each source label
maps onto the target's labels. The mapping is explicit:

* a class is mapped to a *set* of target classes. Binary sentiment says "negative" or
  "positive", not which of SST's five classes, so a negative review maps to {very negative,
  negative}; the classifier is trained to put its probability mass on the set
  (``raymtl.objectives.multitask.classifier_loss`` with a ``label_set``), nothing is guessed;
* a score is rescaled linearly from the source range to the target range (SICK 1-5 -> 0-5).

Teachers (``jobs/teacher.py``) train on their target plus these rows; which sets is config
(``related_sets``). Rows whose text also occurs in the target's validation split (or in
its unlabelled test file) are dropped and counted, so validation scores stay honest.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from raymtl.data.readers import DataError, ReadReport, read_bytes, read_task_file, text_line
from raymtl.tasks import TASKS, TaskSpec


@dataclass(frozen=True)
class RelatedSet:
    name: str
    target: str                                    # task whose head it trains
    source: TaskSpec | None                        # format of a TAB-separated file (None: line files)
    paths: tuple[str, ...]                         # relative to the data directory
    class_map: dict[int, tuple[int, ...]] = field(default_factory=dict)   # source class -> target classes
    score_range: tuple[float, float] = (0.0, 0.0)  # source score range, rescaled onto the target's
    line_labels: tuple[int, ...] = ()              # line files: the source class of each path
    note: str = ""


SENTIMENT = {0: (0, 1), 1: (3, 4)}                 # binary -> SST {very neg, neg} / {pos, very pos}

RELATED: dict[str, RelatedSet] = {
    "sst2": RelatedSet(
        "sst2", "sst", TaskSpec("sst2", "sst2/train.tsv", ("sentence",), "label", "class", 2, id_col=""),
        ("sst2/train.tsv",), SENTIMENT, note="GLUE SST-2 train phrases (from SST's train sentences)"),
    "cfimdb": RelatedSet(
        "cfimdb", "sst", TaskSpec("cfimdb", "cfimdb/train.csv", ("sentence",), "sentiment", "class", 2),
        ("cfimdb/train.csv", "cfimdb/dev.csv"), SENTIMENT, note="IMDB reviews, truncated to max_length"),
    "mr": RelatedSet(
        "mr", "sst", None, ("mr/rt-polarity.neg", "mr/rt-polarity.pos"), SENTIMENT, line_labels=(0, 1),
        note="off by default: SST was built from these snippets, so MR holds SST's dev and test "
             "sentences too (rows matching our validation split and sst/test-unlabeled.csv are dropped, "
             "but the official dev set is not here to filter)"),
    "mrpc": RelatedSet(
        "mrpc", "quora", TaskSpec("mrpc", "mrpc/msr_paraphrase_train.txt", ("#1 String", "#2 String"),
                                  "Quality", "class", 2, id_col="#1 ID"),
        ("mrpc/msr_paraphrase_train.txt",), {0: (0,), 1: (1,)}, note="news sentence pairs, paraphrase 0/1"),
    "sick": RelatedSet(
        "sick", "sts", TaskSpec("sick", "sick/SICK_train.txt", ("sentence_A", "sentence_B"),
                                "relatedness_score", "score", label_range=(1.0, 5.0), id_col="pair_ID"),
        ("sick/SICK_train.txt", "sick/SICK_trial.txt"), score_range=(1.0, 5.0),
        note="relatedness 1-5 rescaled to 0-5"),
}

# What a teacher uses when the config does not say (``jobs/teacher.py --related-sets``).
DEFAULT_RELATED: dict[str, tuple[str, ...]] = {"sst": ("sst2", "cfimdb"), "quora": ("mrpc",), "sts": ("sick",)}


def get_related(name: str) -> RelatedSet:
    if name not in RELATED:
        raise ValueError(f"unknown related data set {name!r}; valid: {sorted(RELATED)}")
    return RELATED[name]


def label_set(target: TaskSpec, classes) -> int:
    """Bitmask of target classes (bit c set: class c allowed)."""
    mask = 0
    for c in classes:
        if not 0 <= c < target.num_labels:
            raise ValueError(f"class {c} is outside task {target.name!r}'s labels 0..{target.num_labels - 1}")
        mask |= 1 << c
    return mask


def map_row(rs: RelatedSet, row: dict) -> dict:
    """A source row with its label mapped into the target space (``label``, ``label_set``)."""
    target = TASKS[rs.target]
    if target.label_type == "class":
        classes = rs.class_map[int(row["label"])]
        exact = classes[0] if len(classes) == 1 else -1.0     # -1: only the set is known
        return {**row, "label": float(exact), "label_set": label_set(target, classes)}
    (lo, hi), (tlo, thi) = rs.score_range, target.label_range
    return {**row, "label": tlo + (row["label"] - lo) * (thi - tlo) / (hi - lo), "label_set": 0}


def _read_lines(path: str, label: int, max_rows: int) -> tuple[list[dict], ReadReport]:
    report, rows = ReadReport(path), []
    for lineno, raw in enumerate(read_bytes(path).split(b"\n"), start=1):
        if max_rows and len(rows) >= max_rows:
            break
        text = text_line(raw)
        if isinstance(text, tuple):
            if text[1]:                                # bad bytes; a blank line is no row
                report.bad.append((lineno, text[0]))
            continue
        rows.append({"id": str(lineno), "line": lineno, "text_a": text, "text_b": "", "label": float(label)})
    report.rows = len(rows)
    return rows, report


def read_related(name: str, data_dir: str, max_rows: int = 0, max_bad_fraction: float = 0.01
                 ) -> tuple[list[dict], list[ReadReport]]:
    """Every row of a related set, labels mapped into its target's space."""
    rs, rows, reports = get_related(name), [], []
    for i, rel in enumerate(rs.paths):
        path = f"{data_dir.rstrip('/')}/{rel}"
        if rs.source is None:
            got, report = _read_lines(path, rs.line_labels[i], max_rows)
        else:
            got, report = read_task_file(rs.source, path, max_rows=max_rows, max_bad_fraction=max_bad_fraction)
        rows += [{**map_row(rs, r), "source": name} for r in got]
        reports.append(report)
    return rows, reports


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


class Overlap:
    """Membership test against held-out rows: the same pair (either order), or (single
    sentences) a phrase of ``min_words`` or more words inside a held-out sentence."""

    def __init__(self, held_out: list[dict], min_words: int = 3):
        self.pairs = {(_norm(r["text_a"]), _norm(r["text_b"])) for r in held_out}
        self.haystack = "\n".join(_norm(r["text_a"]) for r in held_out)
        self.min_words = min_words

    def __contains__(self, row: dict) -> bool:
        a, b = _norm(row["text_a"]), _norm(row["text_b"])
        return ((a, b) in self.pairs or (b, a) in self.pairs
                or (not b and len(a.split()) >= self.min_words and a in self.haystack))


def drop_overlap(rows: list[dict], held_out: list[dict], min_words: int = 3) -> tuple[list[dict], int]:
    """Rows minus those whose text occurs in a held-out row (``Overlap``)."""
    overlap = Overlap(held_out, min_words)
    kept = [r for r in rows if r not in overlap]
    return kept, len(rows) - len(kept)


def test_file(task: str, data_dir: str) -> str | None:
    """The task's unlabelled test file, when the (local) data directory has it."""
    test = Path(data_dir) / Path(TASKS[task].path).parent / "test-unlabeled.csv"
    return str(test) if "://" not in data_dir and test.is_file() else None


def held_out_rows(task: str, data_dir: str, val: list[dict]) -> list[dict]:
    """What a related row must not repeat: the task's validation rows and, when the data
    directory has it, its unlabelled test file."""
    test = test_file(task, data_dir)
    if test:
        val = val + read_task_file(TASKS[task], test, with_labels=False,
                                   max_bad_fraction=1.0, allow_empty_text=True)[0]
    return val


def sets_of(task: str, names) -> list[RelatedSet]:
    """The related sets ``names`` of ``task``; a set made for another task is refused."""
    out = []
    for name in names:
        rs = get_related(name)
        if rs.target != task:
            raise ValueError(f"related set {name!r} is for task {rs.target!r}, not {task!r}")
        out.append(rs)
    return out


def overlap_reason(task: str) -> str:
    return f"text also in {task}'s validation split or test file"


def related_rows(task: str, names: tuple[str, ...], data_dir: str, held_out: list[dict], max_rows: int = 0,
                 max_bad_fraction: float = 0.01) -> tuple[list[dict], list[str]]:
    """Training rows for ``task`` from its related sets, minus overlap with ``held_out``
    (its validation split, and its unlabelled test file when present); report lines."""
    held_out = held_out_rows(task, data_dir, held_out)
    out, lines = [], []
    for rs in sets_of(task, names):
        name = rs.name
        rows, reports = read_related(name, data_dir, max_rows, max_bad_fraction)
        kept, dropped = drop_overlap(rows, held_out)
        lines += [r.summary() for r in reports]
        lines.append(f"{name} -> {task}: {len(kept)} rows ({dropped} dropped: text also in {task}'s "
                     "validation split or test file)")
        out += kept
    if not out:
        raise DataError(f"related sets {list(names)} of task {task!r} left no rows")
    return out, lines
