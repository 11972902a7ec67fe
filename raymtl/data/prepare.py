"""The prepare pass: read, check and tokenize an input once, in parallel in Ray Data, into
cached Parquet shards that training streams from.

Every input file is cut into byte ranges that end at line ends (``line_ranges``: the driver
streams the file once to count its lines, in constant memory; a ``hf:`` data set is cut
into row ranges). Each range is one Ray Data task (``map_batches`` over the ranges, an actor
pool the size of the cluster's CPUs) that reads its own bytes, checks every line with a
``Parser``, tokenizes the rows and emits one Parquet row per outcome, partitioned by
``kind``: the training kinds (``mlm``, ``row``, ...), ``_bad`` (one row per malformed line:
``file:line`` and the reason) and ``_skipped`` (lines skipped by design, counted per range
and reason). The driver never holds the rows: it reads back only the outcome counts, writes
``rejects.tsv`` beside the shards and stops before any training when a file has more than
``max_bad_fraction`` malformed lines.

A prepared input lives in ``<cache_dir>/<name>-<key>/`` with a ``manifest.json``; ``key``
hashes the input bytes, the tokenizer and every setting that changes the rows, so a second
run reads the shards and tokenizes nothing (``--force-prepare`` rebuilds). A cache is
written to a temporary directory and renamed into place, so a half-written one never counts.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.fs as pafs

from raymtl.data.readers import DataError

CHUNK_BYTES = 4 << 20                   # bytes of text per prepare task
FORMAT_VERSION = 3


# ------------------------------------------------------------------------------ reports
@dataclass
class LineReport:
    """What became of every line of one file: rows made, lines skipped by design (blank,
    heading, neutral) and malformed lines, as ``{reason: [count, [first line numbers]]}``."""
    path: str
    lines: int = 0
    rows: int = 0
    skipped: dict[str, list] = field(default_factory=dict)
    bad: dict[str, list] = field(default_factory=dict)

    def add(self, reason: str, line: int, count: int = 1, malformed: bool = False) -> None:
        entry = (self.bad if malformed else self.skipped).setdefault(reason, [0, []])
        entry[0] += count
        if len(entry[1]) < 3:
            entry[1] = sorted(entry[1] + [line])[:3]

    def n_bad(self) -> int:
        return sum(n for n, _ in self.bad.values())

    def summary(self) -> str:
        name = self.path.rsplit("/", 1)[-1]
        s = f"{self.path}: {self.lines} lines -> {self.rows} rows"
        for kind, groups in (("skipped", self.skipped), ("malformed", self.bad)):
            for reason, (n, first) in groups.items():
                where = ", ".join(f"{name}:{x}" for x in first) + (" ..." if n > len(first) else "")
                s += f"\n  {kind} {n} x {reason} ({where})"
        return s


def check_bad_fraction(report: LineReport, max_bad_fraction: float, rejects: str = "") -> None:
    if report.lines and report.n_bad() / report.lines > max_bad_fraction:
        raise DataError(f"{report.path}: {report.n_bad()} of {report.lines} lines are malformed, more than "
                        f"max_bad_fraction={max_bad_fraction}" + (f" (every one in {rejects})" if rejects else "")
                        + "\n" + report.summary())


# ------------------------------------------------------------------------------ reading
def file_system(path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), os.path.abspath(path))


def line_ranges(path: str, chunk_bytes: int = 0, skip_lines: int = 0,
                max_lines: int = 0) -> tuple[list[dict], int]:
    """Byte ranges of about ``chunk_bytes`` that end at line ends, each with the number of its
    first line (1-based), after the first ``skip_lines`` lines; and the number of lines in them.
    The file is streamed once (constant memory). ``max_lines`` > 0 stops after that many lines."""
    if path.startswith("hf:"):
        return hf_ranges(path, max_lines)
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    fs, p = file_system(path)
    ranges, start, pos, line = [], 0, 0, 1          # line: the number of the line that starts at ``start``
    last_wanted = skip_lines + max_lines if max_lines else 0
    try:
        with fs.open_input_stream(p) as f:
            while block := f.read(chunk_bytes):
                i = 0
                while line <= skip_lines and (nl := block.find(b"\n", i)) >= 0:    # the header
                    i, line, start = nl + 1, line + 1, pos + nl + 1
                if line > skip_lines:
                    n = block.count(b"\n", i)
                    if last_wanted and line - 1 + n >= last_wanted:             # the cap ends in this block
                        for _ in range(last_wanted - line + 1):
                            i = block.find(b"\n", i) + 1
                        if pos + i > start:
                            ranges.append({"path": path, "start": start, "end": pos + i, "first_line": line})
                        return ranges, max_lines
                    last = block.rfind(b"\n")
                    if last >= i:
                        ranges.append({"path": path, "start": start, "end": pos + last + 1, "first_line": line})
                        line, start = line + n, pos + last + 1
                pos += len(block)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"cannot read data file {path}: {e}") from None
    if pos > start and line > skip_lines:                            # no newline at the end
        ranges.append({"path": path, "start": start, "end": pos, "first_line": line})
        line += 1
    return ranges, max(line - 1 - skip_lines, 0)


def hf_dataset(path: str):
    """``hf:NAME[:CONFIG[:SPLIT]]`` (the hub) or ``hf:DIR[:SPLIT]`` (a ``save_to_disk`` directory)."""
    import datasets
    name, *rest = path[3:].split(":")
    if os.path.isdir(name):
        ds = datasets.load_from_disk(name)
        split = rest[-1] if rest else "train"
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    config, split = (rest + ["", ""])[:2]
    return datasets.load_dataset(name, config or None, split=split or "train")


def hf_ranges(path: str, max_lines: int = 0, rows_per_range: int = 50_000) -> tuple[list[dict], int]:
    ds = hf_dataset(path)
    if "text" not in ds.column_names:
        raise DataError(f"{path}: the data set has no 'text' column (columns: {ds.column_names})")
    n = min(len(ds), max_lines) if max_lines else len(ds)
    return [{"path": path, "start": i, "end": min(i + rows_per_range, n), "first_line": i + 1}
            for i in range(0, n, rows_per_range)], n


def range_lines(r: dict):
    """(line number, raw bytes) of every line of one range."""
    if r["path"].startswith("hf:"):
        texts = hf_dataset(r["path"])[int(r["start"]):int(r["end"])]["text"]
        yield from ((int(r["first_line"]) + i, t.rstrip("\n").encode()) for i, t in enumerate(texts))
        return
    fs, p = file_system(r["path"])
    with fs.open_input_file(p) as f:
        data = f.read_at(int(r["end"]) - int(r["start"]), int(r["start"]))
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    yield from ((int(r["first_line"]) + i, raw) for i, raw in enumerate(lines))


# ------------------------------------------------------------------------------ parsers
class Parser:
    """Turns the lines of one range into rows. ``parse`` gives, per line, either rows
    (dicts with a ``kind``; kinds starting with ``_`` are outcomes, not data) or a
    ``(reason, malformed)`` pair; ``tokenize`` turns a range's data rows into the rows
    written, with their id columns (one tokenizer call per column)."""
    columns: dict[str, Any] = {}                    # output column -> empty value

    def parse(self, path: str, line: int, raw: bytes) -> list[dict] | tuple[str, bool]:
        raise NotImplementedError

    def tokenize(self, rows: list[dict]) -> list[dict]:
        raise NotImplementedError


_INSTANCES: dict[str, Any] = {}


def per_process(spec: tuple[type, dict]) -> Any:
    """One parser (and its tokenizer) per worker process and spec. Prepare steps are Ray Data
    tasks, not an actor pool: a pool's actors get their constructor arguments through the
    object store, which makes Ray's core worker print a warning on the driver's console."""
    cls, kwargs = spec
    key = f"{cls.__module__}.{cls.__qualname__}{json.dumps(kwargs, sort_keys=True)}"
    if key not in _INSTANCES:
        _INSTANCES[key] = cls(**kwargs)
    return _INSTANCES[key]


def prepare_ranges(batch: dict[str, np.ndarray], parser: tuple[type, dict]) -> dict[str, list]:
    """Ray Data ``map_batches`` function over ranges: every line parsed, the rows tokenized."""
    p = per_process(parser)
    cols = {"kind": [], "source": [], "reason": [], "count": [], **{c: [] for c in p.columns}}
    rows, skipped = [], {}
    for r in (dict(zip(batch, values)) for values in zip(*batch.values())):
        path = str(r["path"])
        for line, raw in range_lines(r):
            out = p.parse(path, line, raw)
            if isinstance(out, tuple):
                reason, malformed = out
                if malformed:
                    rows.append({"kind": "_bad", "source": f"{path}:{line}", "reason": reason})
                else:                  # by design: one row per (file, reason) of the range
                    entry = skipped.setdefault((path, reason), [0, []])
                    entry[0] += 1
                    if len(entry[1]) < 3:
                        entry[1].append(line)
            else:
                rows += out
    rows = p.tokenize([r for r in rows if not r["kind"].startswith("_")]) + [
        r for r in rows if r["kind"].startswith("_")]
    for (path, reason), (n, first) in skipped.items():
        rows.append({"kind": "_skipped", "source": f"{path}:{','.join(map(str, first))}",
                     "reason": reason, "count": n})
    for row in rows:
        cols["kind"].append(row["kind"])
        cols["source"].append(row.get("source", ""))
        cols["reason"].append(row.get("reason", ""))
        cols["count"].append(row.get("count", 1))
        for c, empty in p.columns.items():
            cols[c].append(row.get(c, empty))
    return cols


def parse_pass(ds, parser: tuple[type, dict]):
    """Parse + tokenize every range of ``ds`` (a dataset of ranges), one task per range."""
    return ds.map_batches(prepare_ranges, fn_kwargs={"parser": parser}, batch_size=1, num_cpus=1)


def write_parts(ds, out: Path, rows_per_file: int, by: str = "kind") -> None:
    """Write a pass's rows under ``out``, one ``<by>=<value>`` directory per value, in files
    named in write order (``part-<task>-<write>``: a rebuilt cache lists its files in the same
    order, so a seed trains on the same batches)."""
    from ray.data.datasource import FilenameProvider

    class InOrder(FilenameProvider):
        def get_filename_for_task(self, write_uuid, task_index):
            return f"part-{task_index:06d}-{write_uuid}.parquet"
    ds.write_parquet(str(out), partition_cols=[by], max_rows_per_file=rows_per_file, filename_provider=InOrder())


def ranges_dataset(ranges: list[dict]):
    import ray.data
    return ray.data.from_items(ranges, override_num_blocks=max(1, len(ranges)))


# ------------------------------------------------------------------------------ outcomes
def count_rows(root: Path, value: str, by: str = "kind") -> int:
    """Rows of one part, from the Parquet footers (no data is read)."""
    import pyarrow.parquet as pq
    return sum(pq.ParquetFile(f).metadata.num_rows for f in (root / f"{by}={value}").glob("*.parquet"))


def collect_reports(root: Path, reports: dict[str, LineReport], rejects: Path) -> None:
    """Add the ``_bad`` and ``_skipped`` outcomes under ``root`` to the per-file reports (read
    in batches, never whole) and append every malformed line to ``rejects`` as ``file:line: reason``."""
    import pyarrow.parquet as pq
    with rejects.open("a") as out:
        for kind in ("_bad", "_skipped"):
            for f in sorted((root / f"kind={kind}").glob("*.parquet")):
                for b in pq.ParquetFile(f).iter_batches(columns=["source", "reason", "count"], batch_size=65536):
                    for source, reason, n in zip(*(b.column(i).to_pylist() for i in range(3))):
                        path, lines = source.rsplit(":", 1)
                        first = [int(x) for x in lines.split(",")]
                        report = reports.setdefault(path, LineReport(path))
                        for j, line in enumerate(first):
                            report.add(reason, line, count=(n - len(first) + 1) if j == 0 else 1,
                                       malformed=kind == "_bad")
                        if kind == "_bad":
                            out.write(f"{source}: {reason}\n")


# ------------------------------------------------------------------------------ the cache
def sha256_of(path: str) -> str:
    """Content hash of a file (streamed), or the name of a ``hf:`` data set (plus its files'
    fingerprint when it is a local ``save_to_disk`` directory)."""
    if path.startswith("hf:"):
        return path if not os.path.isdir(path[3:].split(":")[0]) else hf_dataset(path)._fingerprint
    fs, p = file_system(path)
    h = hashlib.sha256()
    try:
        with fs.open_input_stream(p) as f:
            while block := f.read(16 << 20):
                h.update(block)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"cannot read data file {path}: {e}") from None
    return h.hexdigest()


def tokenizer_fingerprint(source: str) -> str:
    """Hash of the tokenizer's full definition (vocabulary, normalizer, special tokens)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(source)
    body = tok.backend_tokenizer.to_str() if getattr(tok, "is_fast", False) else json.dumps(
        sorted(tok.get_vocab().items()))
    return hashlib.sha256(f"{type(tok).__name__}\n{body}".encode()).hexdigest()


@dataclass
class Prepared:
    """Shards of one prepared input. ``tokenized`` is False when the cache was reused."""
    path: str
    counts: dict[str, int]
    reports: list[dict]
    notes: list[str]
    tokenized: bool
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [LineReport(**r).summary() for r in self.reports] + self.notes
        how = (f"prepared in {self.seconds:.0f} s" if self.tokenized
               else "cached: prepare pass skipped (--force-prepare rebuilds)")
        return "\n".join(lines + [f"shards {how}: {self.path} {self.counts}"])

    def dataset(self, part: str, columns: list[str] | None = None, seed: int | None = None,
                in_memory: bool = False):
        """Stream one part's shards (``read_parquet``; with ``seed``, the files in a seeded order
        that changes at every epoch, the same in every run; ``cycle_batches``' seeded local
        shuffle buffer mixes the rows). Read tasks ask for no CPU, so they run beside
        training workers that hold every CPU. ``in_memory``: read it whole now (small
        validation sets, which every worker reads again at every validation)."""
        import ray.data
        shuffle = ray.data.FileShuffleConfig(seed=seed) if seed is not None else None
        ds = ray.data.read_parquet(f"{self.path}/{part}", columns=columns, shuffle=shuffle, num_cpus=0,
                                   partitioning=None)
        return ds.materialize() if in_memory else ds


def cached(cache_dir: str, name: str, settings: dict, force: bool,
           build: Callable[[Path, Path], tuple[dict[str, int], list[LineReport], list[str]]]) -> Prepared:
    """The shards of ``settings`` under ``cache_dir``: reused, or built by ``build(tmp_dir,
    rejects_file)`` (which returns the row counts, the line reports and notes) and renamed into
    place. The rejects file (every malformed line) lies beside: ``<name>-<key>.rejects.tsv``."""
    if "://" in cache_dir:
        raise DataError(f"cache_dir={cache_dir!r}: the shard cache must be a local or mounted shared "
                        "directory (on a multi-node cluster: NFS or another shared file system)")
    settings = {"version": FORMAT_VERSION, **settings}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser().resolve() / f"{name}-{key}"
    if (root / "manifest.json").is_file() and not force:
        m = json.loads((root / "manifest.json").read_text())
        return Prepared(str(root), m["counts"], m["reports"], m["notes"], tokenized=False)
    t0 = time.perf_counter()
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rejects = root.with_name(f"{root.name}.rejects.tsv")
    rejects.unlink(missing_ok=True)
    rejects.touch()
    try:
        counts, reports, notes = build(tmp, rejects)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = {"counts": counts, "reports": [asdict(r) for r in reports], "notes": notes, "settings": settings}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if force and root.exists():
        shutil.rmtree(root, ignore_errors=True)
    try:
        tmp.rename(root)                               # atomic: a half-written cache never counts
    except OSError:                                    # another run finished first: use its shards
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(str(root), counts, manifest["reports"], notes, tokenized=True, seconds=time.perf_counter() - t0)
