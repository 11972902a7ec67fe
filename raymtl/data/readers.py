"""Read the task files and carve seeded validation splits.

Readers validate every row against the task table (``raymtl.tasks``). A bad row is never
guessed at and never dropped silently: it is reported as ``file:line: reason``, counted
per file, and the read fails when a file has more bad rows than ``max_bad_fraction``
allows, or lacks a required column.

Each target task's file comes in two layouts: the minBERT project's (TAB-separated ``.csv``,
a blank-named row-index column, Quora pairs as ``sentence1/sentence2``) and GLUE's (QQP's
``question1/question2``, STS-B's ``score``, ``index`` ids). The task table names one layout's
columns; its ``other_names`` give the names the same column has in the other.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from raymtl.tasks import TaskSpec

log = logging.getLogger("raymtl.data")


class DataError(ValueError):
    """A data file cannot be used; the message names the file and line or column."""


@dataclass
class ReadReport:
    path: str
    rows: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)

    def summary(self) -> str:
        s = f"{self.path}: {self.rows} rows read, {len(self.bad)} skipped"
        for line, reason in self.bad[:5]:
            s += f"\n  {self.path}:{line}: {reason}"
        if len(self.bad) > 5:
            s += f"\n  ... and {len(self.bad) - 5} more"
        return s


def read_bytes(path: str) -> bytes:
    """Read a local path or any URI pyarrow understands (s3://, gs://, hdfs://)."""
    try:
        fs, p = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
        with fs.open_input_stream(p) as f:
            return f.read()
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"cannot read data file {path}: {e}") from None


def decode(raw: bytes) -> str:
    """One line's bytes as text (a trailing CR dropped); ValueError names the first bad byte."""
    try:
        return raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte {e.start})") from None


def text_line(raw: bytes) -> str | tuple[str, bool]:
    """One line as stripped text, or a parser's outcome: ``(reason, True)`` for bytes that are
    not UTF-8, ``("blank line", False)`` for a blank one."""
    try:
        text = decode(raw).strip()
    except ValueError as e:
        return str(e), True
    return text or ("blank line", False)


def check_line(spec: TaskSpec, fields: int, col: dict[str, int], line: int, raw: bytes, *,
               with_labels: bool = True, allow_empty_text: bool = False) -> dict[str, Any] | tuple[str, bool]:
    """One line of a TAB-separated file of ``spec``'s format (``fields`` columns, ``col`` the
    positions of its columns), checked against the task table: the row ``{"id", "line",
    "text_a", "text_b", "label"}``, or ``(reason, True)`` for a bad line. The one definition of a
    valid row: ``read_task_file`` and the prepare pass's parsers (``raymtl.data.multitask``) call it."""
    try:
        values = decode(raw).split("\t")
    except ValueError as e:
        return str(e), True
    if len(values) != fields:
        return f"expected {fields} TAB-separated fields, got {len(values)}", True
    texts = [values[col[c]].strip() for c in spec.text_cols]
    empty = [c for c, t in zip(spec.text_cols, texts) if not t]
    if empty and not allow_empty_text:
        return f"empty text in column(s) {empty}", True
    label = 0.0
    if with_labels:
        try:
            label = float(spec.parse_label(values[col[spec.label_col]]))
        except ValueError as e:
            return str(e), True
    return {"id": values[col[spec.id_col]].strip() if spec.id_col else str(line), "line": line,
            "text_a": texts[0], "text_b": texts[1] if spec.is_pair else "", "label": label}


def column_positions(spec: TaskSpec, header: list[str], required: list[str], path: str) -> dict[str, int]:
    """Position of each required column in ``header``, under its task-table name or its other layout's."""
    col, missing = {}, []
    for c in required:
        names = (c, *spec.other_names.get(c, ()))
        found = [n for n in names if n in header]
        if found:
            col[c] = header.index(found[0])
        else:
            missing.append(" or ".join(names))
    if missing:
        raise DataError(f"{path}:1: missing required column(s) {missing} for task {spec.name!r}; "
                        f"header has {header}")
    return col


def read_task_file(spec: TaskSpec, path: str, *, with_labels: bool = True, max_rows: int = 0,
                   max_bad_fraction: float = 0.01, allow_empty_text: bool = False
                   ) -> tuple[list[dict[str, Any]], ReadReport]:
    """Read a TAB-separated task file (minBERT ``.csv`` or GLUE ``.tsv`` layout) by header names.

    Returns rows ``{"id", "line", "text_a", "text_b", "label"}`` and a report of skipped rows.
    """
    raw_lines = read_bytes(path).split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    if not raw_lines:
        raise DataError(f"{path}: file is empty")
    header = raw_lines[0].decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r").split("\t")
    required = ([spec.id_col] if spec.id_col else []) + [*spec.text_cols] + ([spec.label_col] if with_labels else [])
    col = column_positions(spec, header, required, path)
    report = ReadReport(path)
    rows: list[dict[str, Any]] = []
    for lineno, raw in enumerate(raw_lines[1:], start=2):
        if max_rows and report.rows + len(report.bad) >= max_rows:
            break
        row = check_line(spec, len(header), col, lineno, raw, with_labels=with_labels,
                         allow_empty_text=allow_empty_text)
        if isinstance(row, tuple):
            report.bad.append((lineno, row[0]))
            continue
        rows.append(row)
        report.rows += 1
    total = report.rows + len(report.bad)
    for line, reason in report.bad[:20]:
        log.warning("%s:%d: skipped row: %s", path, line, reason)
    if total and len(report.bad) / total > max_bad_fraction:
        raise DataError(f"{path}: {len(report.bad)} of {total} rows are malformed, more than "
                        f"max_bad_fraction={max_bad_fraction}\n" + report.summary())
    if not rows:
        raise DataError(f"{path}: no usable rows\n" + report.summary())
    return rows, report


def split_rows(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded shuffle, then carve ``val_fraction`` of the rows (at least one) for validation."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(rows) * val_fraction)))
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]
