"""The multi-task data: every task's splits (and related rows), tokenized in one Ray Data
pass for its pair mode, and padded into batches (``collate``). Files are read and checked
by ``raymtl.data.readers``.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ray.data import Dataset

from raymtl.data.prepare import (
    LineReport,
    Parser,
    Prepared,
    cached,
    check_bad_fraction,
    collect_reports,
    count_rows,
    file_system,
    line_ranges,
    parse_pass,
    ranges_dataset,
    sha256_of,
    tokenizer_fingerprint,
    write_parts,
)
from raymtl.data.readers import (
    DataError,
    ReadReport,
    check_line,
    column_positions,
    read_task_file,
    split_rows,
    text_line,
)
from raymtl.data.related import (
    Overlap,
    get_related,
    held_out_rows,
    map_row,
    overlap_reason,
    related_rows,
    sets_of,
    test_file,
)
from raymtl.tasks import TASKS, TaskSpec

EMPTY = np.zeros(0, np.int32)


# ---------------------------------------------------------------------------- tokenization
def encode(tokenizer, text_a: list[str], text_b: list[str], mode: str | None, max_length: int,
           prefix: str = "") -> dict[str, list[list[int]]]:
    """Token ids for one batch. mode None: single sentence; 'cross': one joint sequence;
    'bi': two separate sequences (ids_b). ``prefix`` is a textual task prefix."""
    if prefix:
        text_a = [prefix + x for x in text_a]
        text_b = [prefix + x for x in text_b] if mode == "bi" else text_b
    if mode == "cross":
        enc = tokenizer(text_a, text_b, truncation="longest_first", max_length=max_length,
                        return_token_type_ids=True)
        return {"ids_a": enc["input_ids"], "tt_a": enc["token_type_ids"],
                "ids_b": [[] for _ in text_a]}
    enc_a = tokenizer(text_a, truncation=True, max_length=max_length)
    ids_b = (tokenizer(text_b, truncation=True, max_length=max_length)["input_ids"]
             if mode == "bi" else [[] for _ in text_a])
    return {"ids_a": enc_a["input_ids"], "tt_a": [[0] * len(x) for x in enc_a["input_ids"]],
            "ids_b": ids_b}


def _pad(seqs, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Pad each batch only to its own longest row (dynamic padding)."""
    ids_a, mask_a = _pad(batch["ids_a"])
    tt_a, _ = _pad(batch["tt_a"])
    out = {"input_ids": ids_a, "attention_mask": mask_a, "token_type_ids": tt_a,
           "label": torch.tensor(np.asarray(batch["label"], dtype=np.float32)),
           "line": torch.tensor(np.asarray(batch["line"], dtype=np.int64))}
    if "label_set" in batch:      # classifier rows: bitmask of allowed classes (raymtl.data.related)
        out["label_set"] = torch.tensor(np.asarray(batch["label_set"], dtype=np.int64))
    if "teacher" in batch:        # teacher logits / scores (raymtl.stages.distill), (B, C)
        out["teacher"] = torch.tensor(np.stack([np.asarray(x, dtype=np.float32) for x in batch["teacher"]]))
    if len(batch["ids_b"]) and len(batch["ids_b"][0]):
        out["input_ids_b"], out["attention_mask_b"] = _pad(batch["ids_b"])
    return out


def batch_from_rows(tokenizer, rows: list[dict], mode: str | None, max_length: int,
                    prefix: str = "") -> dict[str, torch.Tensor]:
    """Tokenize and collate rows directly (evaluation / prediction outside Ray Data)."""
    enc = encode(tokenizer, [r["text_a"] for r in rows], [r["text_b"] for r in rows], mode, max_length, prefix)
    return collate({**enc, "label": [r["label"] for r in rows], "line": [r["line"] for r in rows]})


# ---------------------------------------------------------------------------- Ray Data
def load_splits(data_cfg, verbose: bool = False) -> tuple[dict[str, tuple[list[dict], list[dict]]], list[ReadReport]]:
    """Read every task's train file and carve its seeded validation split. Tasks with
    ``related_sets`` get a third list: the related rows mapped into their label space
    (``raymtl.data.related``), minus any overlap with the validation split."""
    splits, reports = {}, []
    for name in data_cfg.tasks:
        spec = TASKS[name]
        rows, report = read_task_file(spec, f"{data_cfg.data_dir.rstrip('/')}/{spec.path}",
                                      max_rows=data_cfg.max_rows,
                                      max_bad_fraction=data_cfg.max_bad_fraction)
        reports.append(report)
        train, val = split_rows(rows, data_cfg.val_fraction, data_cfg.split_seed)
        splits[name] = (train, val)
        if data_cfg.related_of(name):
            extra, lines = related_rows(name, data_cfg.related_of(name), data_cfg.data_dir, val,
                                        data_cfg.max_rows, data_cfg.max_bad_fraction)
            splits[name] = (train, val, extra)
            if verbose:
                for line in lines:
                    print("[raymtl] related " + line, flush=True)
    return splits, reports


def label_set_of(spec: TaskSpec, row: dict) -> int:
    """Bitmask of the classes a row allows: its own class, or a related row's mapped set."""
    if "label_set" in row:
        return int(row["label_set"])
    return 1 << int(row["label"]) if spec.label_type == "class" else 0


# ---------------------------------------------------------------------------- the prepare pass
class TaskParser(Parser):
    """The lines of one task file (after its header) -> checked, tokenized rows (as
    ``raymtl.data.readers.read_task_file`` checks them), for the task's input mode."""
    columns = {"line": 0, "text_a": "", "text_b": "", "label": 0.0, "label_set": 0,
               "ids_a": EMPTY, "tt_a": EMPTY, "ids_b": EMPTY}

    def __init__(self, task: str, fields: int, positions: dict[str, int], tokenizer_source: str,
                 mode: str | None, max_length: int, prefix: str = ""):
        from transformers import AutoTokenizer
        self.spec, self.fields, self.col = TASKS[task], fields, positions
        self.tok = AutoTokenizer.from_pretrained(tokenizer_source)
        self.mode, self.max_length, self.prefix = mode, max_length, prefix

    def parse(self, path, line, raw):
        out = check_line(self.spec, self.fields, self.col, line, raw)
        return out if isinstance(out, tuple) else [{**out, "kind": "row", "label_set": label_set_of(self.spec, out)}]

    def tokenize(self, rows):
        if rows:
            enc = encode(self.tok, [r["text_a"] for r in rows], [r["text_b"] for r in rows], self.mode,
                         self.max_length, self.prefix)
            for i, r in enumerate(rows):
                r.update({k: np.asarray(enc[k][i], np.int32) for k in ("ids_a", "tt_a", "ids_b")})
        return rows


class RelatedParser(TaskParser):
    """The lines of a task's related sets (``raymtl.data.related``) -> rows in the task's label
    space. ``files``: per path, its set and format (a TAB file's ``fields`` and column
    ``positions``, or a line file's ``label``); labels are mapped by ``map_row``; a row whose
    text is held out (``Overlap``: the task's validation split and test file) is skipped and counted."""

    def __init__(self, task: str, files: dict[str, dict], held_out: list[list[str]], tokenizer_source: str,
                 mode: str | None, max_length: int, prefix: str = ""):
        super().__init__(task, 0, {}, tokenizer_source, mode, max_length, prefix)
        self.files, self.reason = files, overlap_reason(task)
        self.overlap = Overlap([{"text_a": a, "text_b": b} for a, b in held_out])

    def parse(self, path, line, raw):
        f = self.files[path]
        rs = get_related(f["set"])
        if rs.source is None:                          # one text per line, the file's label
            text = text_line(raw)
            if isinstance(text, tuple):
                return text
            row = {"kind": "row", "line": line, "text_a": text, "text_b": "", "label": float(f["label"])}
        else:
            row = check_line(rs.source, f["fields"], f["positions"], line, raw)
            if isinstance(row, tuple):
                return row
            row["kind"] = "row"
        return (self.reason, False) if row in self.overlap else [map_row(rs, row)]


def prepare_related(tmp: Path, rejects: Path, d, task: str, held_out: list[dict],
                    parser: dict) -> tuple[list[LineReport], list[str]]:
    """A task's related sets through one parse pass (every file cut into ranges) into
    ``tmp/split=related``; their line reports and a row count per set. ``parser``: the
    tokenization settings of the task's own pass."""
    files, ranges, reports, per_set = {}, [], {}, {}
    for rs in sets_of(task, d.related_of(task)):
        name = rs.name
        for i, rel in enumerate(rs.paths):
            path = f"{d.data_dir.rstrip('/')}/{rel}"
            if rs.source is None:
                files[path] = {"set": name, "label": rs.line_labels[i]}
                got, lines = line_ranges(path, max_lines=d.max_rows)
            else:
                header = read_header(path)
                required = [*([rs.source.id_col] if rs.source.id_col else []), *rs.source.text_cols, rs.source.label_col]
                files[path] = {"set": name, "fields": len(header),
                               "positions": column_positions(rs.source, header, required, path)}
                got, lines = line_ranges(path, skip_lines=1, max_lines=d.max_rows)
            ranges += got
            reports[path] = LineReport(path, lines=lines)
            per_set.setdefault(name, []).append(path)
    kwargs = {k: parser[k] for k in ("task", "tokenizer_source", "mode", "max_length", "prefix")}
    write_parts(parse_pass(ranges_dataset(ranges), (RelatedParser, {
        **kwargs, "files": files, "held_out": [[r["text_a"], r["text_b"]] for r in held_out]})),
        tmp / "related", ROWS_PER_FILE)
    collect_reports(tmp / "related", reports, rejects)
    notes = []
    for name, paths in per_set.items():
        for path in paths:
            r = reports[path]
            r.rows = r.lines - r.n_bad() - sum(n for n, _ in r.skipped.values())
            check_bad_fraction(r, d.max_bad_fraction, str(rejects))
        notes.append(f"{name} -> {task}: {sum(reports[p].rows for p in paths)} rows")
    if not (tmp / "related" / "kind=row").is_dir():
        raise DataError(f"related sets {list(per_set)} of task {task!r} left no rows\n"
                        + "\n".join(r.summary() for r in reports.values()))
    (tmp / "related" / "kind=row").rename(tmp / "split=related")
    shutil.rmtree(tmp / "related")
    return list(reports.values()), notes


def tag_split(batch: dict[str, np.ndarray], val: np.ndarray, rank: dict) -> dict[str, np.ndarray]:
    """Each row's split and its place in the seeded order of ``split_rows``."""
    lines = batch["line"]
    return {**batch, "split": np.where(np.isin(lines, val), "val", "train"),
            "rank": np.asarray([rank[int(x)] for x in lines], np.int64)}


TRAIN_COLUMNS = ["line", "ids_a", "tt_a", "ids_b", "label", "label_set"]
ROWS_PER_FILE = 2048     # task shards: many files, so a seeded file order reshuffles them every epoch


def prepare_task(data_cfg, task: str, tokenizer_source: str, mode: str | None, prefix: str = "",
                 force: bool = False) -> Prepared:
    """One task's file through the prepare pass: ``split=train``, ``split=val`` (carved exactly
    as ``split_rows`` carves the rows ``read_task_file`` reads) and ``split=related`` (the
    task's related sets through their own parse pass, ``prepare_related``)."""
    import pyarrow.parquet as pq
    import ray.data

    spec, d = TASKS[task], data_cfg
    path = f"{d.data_dir.rstrip('/')}/{spec.path}"
    related = d.related_of(task)
    test = test_file(task, d.data_dir) if related else None      # the overlap filter reads it too
    settings = {"task": task, "file": sha256_of(path), "tokenizer": tokenizer_fingerprint(tokenizer_source),
                "mode": mode, "prefix": prefix, "max_length": d.max_length, "split_seed": d.split_seed,
                "val_fraction": d.val_fraction, "max_rows": d.max_rows, "max_bad_fraction": d.max_bad_fraction,
                "related": {n: [sha256_of(f"{d.data_dir.rstrip('/')}/{f}") for f in get_related(n).paths]
                            for n in related},
                "held_out_test": sha256_of(test) if test else None}

    def build(tmp: Path, rejects: Path):
        header = read_header(path)
        col = column_positions(spec, header, [*([spec.id_col] if spec.id_col else []), *spec.text_cols,
                                              spec.label_col], path)
        ranges, lines = line_ranges(path, skip_lines=1, max_lines=d.max_rows)
        parser = (TaskParser, {"task": task, "fields": len(header), "positions": col, "mode": mode,
                               "tokenizer_source": tokenizer_source, "max_length": d.max_length, "prefix": prefix})
        write_parts(parse_pass(ranges_dataset(ranges), parser), tmp / "rows", 1 << 20)
        report = LineReport(path, lines=lines)
        collect_reports(tmp / "rows", {path: report}, rejects)
        report.rows = lines - report.n_bad()
        check_bad_fraction(report, d.max_bad_fraction, str(rejects))
        files = sorted((tmp / "rows" / "kind=row").glob("*.parquet"))
        row_lines = sorted(int(x) for f in files for x in pq.read_table(f, columns=["line"]).column(0).to_pylist())
        if not row_lines:
            raise DataError(f"{path}: no usable rows\n" + report.summary())
        order = list(range(len(row_lines)))           # exactly split_rows' seeded order
        random.Random(d.split_seed).shuffle(order)
        n_val = max(1, int(round(len(order) * d.val_fraction)))
        val = np.asarray(sorted(row_lines[i] for i in order[:n_val]), np.int64)
        rank = {row_lines[i]: r for r, i in enumerate(order)}
        rows = (ray.data.read_parquet(str(tmp / "rows" / "kind=row"), partitioning=None)
                .map_batches(tag_split, fn_kwargs={"val": val, "rank": rank}, batch_format="numpy")
                .sort("rank").drop_columns(["rank"]))
        write_parts(rows, tmp, ROWS_PER_FILE, by="split")
        reports, notes = [report], []
        if related:
            val_rows = [r for f in sorted((tmp / "split=val").glob("*.parquet"))
                        for r in pq.read_table(f, columns=["text_a", "text_b"]).to_pylist()]
            more, notes = prepare_related(tmp, rejects, d, task, held_out_rows(task, d.data_dir, val_rows), parser[1])
            reports += more
        shutil.rmtree(tmp / "rows" / "kind=row")        # now in split=train / split=val
        counts = {s: count_rows(tmp, s, by="split") for s in ("train", "val", "related")}
        return counts, reports, notes

    return cached(d.cache_dir, f"task-{task}", settings, force or d.force_prepare, build)


def read_header(path: str) -> list[str]:
    fs, p = file_system(path)
    try:
        with fs.open_input_stream(p) as f:
            first = f.read(1 << 16).split(b"\n", 1)[0]
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"cannot read data file {path}: {e}") from None
    if not first.strip():
        raise DataError(f"{path}: file is empty")
    return first.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r").split("\t")


def tokenized_datasets(data_cfg, tokenizer_source: str, modes: dict[str, str | None], prefixes: dict[str, str],
                       seed: int, verbose: bool = False) -> tuple[dict[str, "Dataset"], dict[str, int]]:
    """Every task prepared (or read from the cache): ``train_<task>`` (and ``train_<task>_related``)
    streamed from its shards, ``val_<task>`` read whole; and the training rows per stream."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer  # noqa: F401 -- before the threads: transformers' lazy imports race
    with ThreadPoolExecutor(len(data_cfg.tasks)) as pool:       # the tasks' passes run side by side
        preps = list(pool.map(lambda t: prepare_task(data_cfg, t, tokenizer_source, modes[t], prefixes.get(t, "")),
                              data_cfg.tasks))
    datasets, sizes = {}, {}
    for t, prep in zip(data_cfg.tasks, preps):
        if verbose:
            print("[raymtl] data " + prep.summary(), flush=True)
        datasets[f"train_{t}"] = prep.dataset("split=train", TRAIN_COLUMNS, seed=seed)
        datasets[f"val_{t}"] = prep.dataset("split=val", TRAIN_COLUMNS, in_memory=True)
        sizes[t] = prep.counts["train"]
        if prep.counts.get("related"):
            datasets[f"train_{t}_related"] = prep.dataset("split=related", TRAIN_COLUMNS, seed=seed)
            sizes[f"{t}_related"] = prep.counts["related"]
    return datasets, sizes
