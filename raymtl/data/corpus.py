"""Pre-training data: WikiText and NLI lines -> tokenized Parquet shards, cached.

``prepare_shards(cfg)`` reads the raw files (local paths, URIs, or ``hf:NAME[:CONFIG[:SPLIT]]``
for a Hugging Face dataset's ``text`` column on a machine with hub access), cleans them,
carves held-out Wiki paragraphs and the STS validation split, tokenizes everything in one
Ray Data ``map_batches`` pass and writes one Parquet directory per kind of row::

    <shard_cache>/<key>/mlm/            Wiki paragraphs, in chunks of <= max_length tokens
    <shard_cache>/<key>/mlm_val/        held-out Wiki paragraphs (MLM loss / perplexity)
    <shard_cache>/<key>/simcse_unsup/   Wiki sentences of the training paragraphs
    <shard_cache>/<key>/simcse_sup/     NLI triplets (premise, entailment, contradiction)
    <shard_cache>/<key>/sts_val/        the STS validation split carved as in jobs/mtl.py
    <shard_cache>/<key>/manifest.json   row counts, the read reports, the settings hashed

``key`` hashes the tokenizer (its full definition) and every setting that changes the rows,
so a second run with the same inputs reads the shards instead of tokenizing again. Every
line not used is counted by reason and reported as ``file:line``; malformed lines (bad JSON,
unknown label, non-UTF-8, too short) count against ``max_bad_fraction``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from raymtl.data.multitask import load_splits
from raymtl.data.readers import DataError, read_bytes

KINDS = ("mlm", "mlm_val", "simcse_unsup", "simcse_sup", "sts_val")
COLUMNS = {"mlm": ["ids_a"], "mlm_val": ["ids_a"], "simcse_unsup": ["ids_a"],
           "simcse_sup": ["ids_a", "ids_b", "ids_c"], "sts_val": ["ids_a", "ids_b", "label"]}
FORMAT_VERSION = 1
HEADING = re.compile(r"^=+ .* =+$")
JOIN = re.compile(r" @(\S)@ ")                      # "1 @,@ 000" -> "1,000", "a @-@ b" -> "a-b"
SENTENCE_END = re.compile(r"(?<= [.!?]) +")          # WikiText separates final punctuation
NLI_LABELS = ("entailment", "neutral", "contradiction")


# ------------------------------------------------------------------------------- reports
@dataclass
class LineReport:
    """What became of every line of one file: rows used, lines skipped by design (blank,
    heading, neutral), malformed lines; each with its line numbers."""
    path: str
    lines: int = 0
    rows: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)
    bad: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, line: int, reason: str, malformed: bool = False) -> None:
        (self.bad if malformed else self.skipped).setdefault(reason, []).append(line)

    def n_bad(self) -> int:
        return sum(len(v) for v in self.bad.values())

    def summary(self) -> str:
        name = self.path.rsplit("/", 1)[-1]
        s = f"{self.path}: {self.lines} lines -> {self.rows} rows"
        for kind, groups in (("skipped", self.skipped), ("malformed", self.bad)):
            for reason, lines in groups.items():
                first = sorted(lines)[:3]
                where = ", ".join(f"{name}:{n}" for n in first) + (" ..." if len(lines) > 3 else "")
                s += f"\n  {kind} {len(lines)} x {reason} ({where})"
        return s


def check_bad_fraction(report: LineReport, max_bad_fraction: float) -> None:
    if report.lines and report.n_bad() / report.lines > max_bad_fraction:
        raise DataError(f"{report.path}: {report.n_bad()} of {report.lines} lines are malformed, "
                        f"more than max_bad_fraction={max_bad_fraction}\n" + report.summary())


# ------------------------------------------------------------------------------- readers
def read_lines(path: str, max_lines: int = 0) -> list[bytes]:
    """Raw lines of a file, or the ``text`` column of ``hf:NAME[:CONFIG[:SPLIT]]``."""
    if path.startswith("hf:"):
        import datasets
        name, config, split = (path[3:].split(":") + ["", ""])[:3]
        ds = datasets.load_dataset(name, config or None, split=split or "train")
        texts = ds["text"][:max_lines] if max_lines else ds["text"]
        return [t.rstrip("\n").encode() for t in texts]
    lines = read_bytes(path).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines[:max_lines] if max_lines else lines


def clean_wiki(text: str) -> str:
    """Undo WikiText's tokenization joins; ``<unk>`` stays (the tokenizer maps it)."""
    return re.sub(r"\s+", " ", JOIN.sub(r"\1", f" {text.strip()} ")).strip()


def split_sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(paragraph) if s.strip()]


def read_wiki(path: str, min_words: int, max_lines: int = 0) -> tuple[list[dict], LineReport]:
    """Paragraph rows ``{"source": "file:line", "text"}``; headings and blank lines skipped."""
    report, rows = LineReport(path), []
    for n, raw in enumerate(read_lines(path, max_lines), start=1):
        report.lines += 1
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            report.skip(n, f"not valid UTF-8 (byte {e.start})", malformed=True)
            continue
        if not text:
            report.skip(n, "blank line")
        elif HEADING.match(text):
            report.skip(n, "heading")
        elif len(clean_wiki(text).split()) < min_words:
            report.skip(n, f"fewer than {min_words} words (list item, caption)")
        else:
            rows.append({"source": f"{path}:{n}", "text": clean_wiki(text)})
    report.rows = len(rows)
    return rows, report


def parse_nli(raw: bytes) -> tuple[str, str, str]:
    """One JSON line -> (premise, hypothesis, label); ValueError names the problem."""
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    for key in ("premise", "hypothesis"):
        if not isinstance(d.get(key), str) or not d[key].strip():
            raise ValueError(f"missing or empty {key!r}")
    if d.get("label") not in NLI_LABELS:
        raise ValueError(f"label {d.get('label')!r} is not one of {list(NLI_LABELS)}")
    return d["premise"].strip(), d["hypothesis"].strip(), d["label"]


def read_nli(path: str, max_lines: int = 0) -> tuple[list[dict], LineReport]:
    """Triplet rows ``{"source", "text", "text_b" (entailment), "text_c" (contradiction)}``.
    A premise with e entailment and c contradiction hypotheses gives max(e, c) triplets, the
    shorter list reused in file order; a premise lacking either kind gives none."""
    report, by_premise = LineReport(path), {}
    for n, raw in enumerate(read_lines(path, max_lines), start=1):
        report.lines += 1
        if not raw.strip():
            report.skip(n, "blank line")
            continue
        try:
            premise, hypothesis, label = parse_nli(raw)
        except ValueError as e:
            report.skip(n, str(e), malformed=True)
            continue
        if label == "neutral":
            report.skip(n, "neutral hypothesis (not used)")
            continue
        by_premise.setdefault(premise, {"entailment": [], "contradiction": []})[label].append((n, hypothesis))
    rows = []
    for premise, h in by_premise.items():
        pos, neg = h["entailment"], h["contradiction"]
        if not (pos and neg):
            for n, _ in pos + neg:
                report.skip(n, "premise has no " + ("contradiction" if pos else "entailment") + " hypothesis")
            continue
        for j in range(max(len(pos), len(neg))):
            (n, p), (_, c) = pos[j % len(pos)], neg[j % len(neg)]
            rows.append({"source": f"{path}:{n}", "text": premise, "text_b": p, "text_c": c})
    report.rows = len(rows)
    return rows, report


def resolve(data_dir: str, path: str) -> str:
    return path if path.startswith(("hf:", "/")) or "://" in path else f"{data_dir.rstrip('/')}/{path}"


def collect_rows(cfg) -> tuple[list[dict], list[LineReport]]:
    """Every row to tokenize, tagged with its ``kind``; and one read report per file."""
    p, items, reports, paragraphs = cfg.pretrain, [], {}, []
    for f in p.wiki_files:
        rows, report = read_wiki(resolve(cfg.data.data_dir, f), p.min_words, p.max_lines)
        check_bad_fraction(report, cfg.data.max_bad_fraction)
        paragraphs += rows
        reports[report.path] = report
    if len(paragraphs) <= p.heldout_paragraphs:
        raise DataError(f"only {len(paragraphs)} Wiki paragraphs; heldout_paragraphs={p.heldout_paragraphs} "
                        "leaves none to train on")
    order = list(range(len(paragraphs)))
    random.Random(cfg.data.split_seed).shuffle(order)
    held = set(order[:p.heldout_paragraphs])
    for i, row in enumerate(paragraphs):
        items.append({**row, "kind": "mlm_val" if i in held else "mlm"})
        for sentence in ([] if i in held else split_sentences(row["text"])):
            if len(sentence.split()) >= p.min_words:
                items.append({"source": row["source"], "text": sentence, "kind": "simcse_unsup"})
            else:
                path, line = row["source"].rsplit(":", 1)
                reports[path].skip(int(line), f"sentence of fewer than {p.min_words} words (not for SimCSE)")
    for f in p.nli_files:
        rows, report = read_nli(resolve(cfg.data.data_dir, f), p.max_lines)
        check_bad_fraction(report, cfg.data.max_bad_fraction)
        items += [{**r, "kind": "simcse_sup"} for r in rows]
        reports[report.path] = report
    sts, report = sts_rows(cfg)
    reports[report.path] = report
    return items + sts, list(reports.values())


def sts_rows(cfg) -> tuple[list[dict], LineReport]:
    """The STS validation split, carved exactly as the multi-task stage carves it."""
    splits, (read,) = load_splits(replace(cfg.data, tasks=("sts",), related_sets=()))
    train, val = splits["sts"]
    report = LineReport(read.path, lines=read.rows + len(read.bad), rows=len(val))
    report.skipped["row of the multi-task training split (not used here)"] = sorted(r["line"] for r in train)
    for line, reason in read.bad:
        report.skip(line, reason, malformed=True)
    rows = [{"source": f"{read.path}:{r['line']}", "text": r["text_a"], "text_b": r["text_b"],
             "label": r["label"], "kind": "sts_val"} for r in val]
    return rows, report


# ------------------------------------------------------------------------------ tokenize
class PretrainTokenize:
    """Ray Data ``map_batches`` callable (the tokenizer loads once per actor). MLM paragraphs
    become chunks of at most ``max_length`` tokens ([CLS] ... [SEP]); every other text is one
    sequence truncated to ``max_length``."""

    def __init__(self, tokenizer_source: str, max_length: int):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(tokenizer_source)
        self.tok.model_max_length = 10**9            # paragraphs are chunked, not truncated
        self.max_length = max_length

    def encode(self, texts) -> list[np.ndarray]:
        texts = [str(t).replace("<unk>", self.tok.unk_token) for t in texts]
        return [np.asarray(x, np.int32) for x in
                self.tok(texts, truncation=True, max_length=self.max_length)["input_ids"]]

    def chunks(self, text: str) -> list[np.ndarray]:
        ids = self.tok(str(text).replace("<unk>", self.tok.unk_token), add_special_tokens=False)["input_ids"]
        n = self.max_length - 2
        return [np.asarray([self.tok.cls_token_id, *ids[i:i + n], self.tok.sep_token_id], np.int32)
                for i in range(0, max(len(ids), 1), n)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out = {k: [] for k in ("kind", "source", "ids_a", "ids_b", "ids_c", "label")}
        empty = np.zeros(0, np.int32)
        texts = [(i, c) for i, kind in enumerate(batch["kind"]) if kind not in ("mlm", "mlm_val")
                 for c in ("text", "text_b", "text_c") if batch[c][i]]
        ids = dict(zip(texts, self.encode([batch[c][i] for i, c in texts])))     # one tokenizer call
        for i, kind in enumerate(batch["kind"]):
            seqs = ([(c, empty, empty) for c in self.chunks(batch["text"][i])] if kind in ("mlm", "mlm_val")
                    else [tuple(ids.get((i, c), empty) for c in ("text", "text_b", "text_c"))])
            for a, b, c in seqs:
                for k, v in (("kind", kind), ("source", batch["source"][i]), ("ids_a", a), ("ids_b", b),
                             ("ids_c", c), ("label", float(batch["label"][i]))):
                    out[k].append(v)
        return out


# ------------------------------------------------------------------------------ the cache
def tokenizer_fingerprint(source: str) -> str:
    """Hash of the tokenizer's full definition (vocabulary, normalizer, special tokens)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(source)
    body = tok.backend_tokenizer.to_str() if getattr(tok, "is_fast", False) else json.dumps(
        sorted(tok.get_vocab().items()))
    return hashlib.sha256(f"{type(tok).__name__}\n{body}".encode()).hexdigest()


def file_fingerprint(path: str) -> str:
    return path if path.startswith("hf:") else hashlib.sha256(read_bytes(path)).hexdigest()


def cache_settings(cfg, tokenizer_source: str) -> dict:
    """Everything the shards depend on: inputs (by content), tokenizer, and settings."""
    p, d = cfg.pretrain, cfg.data
    files = [resolve(d.data_dir, f) for f in (*p.wiki_files, *p.nli_files)] + [resolve(d.data_dir, "sts/train.csv")]
    return {"version": FORMAT_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer_source),
            "files": [[f, file_fingerprint(f)] for f in files], "max_length": d.max_length,   # in order
            "split_seed": d.split_seed, "val_fraction": d.val_fraction, "max_rows": d.max_rows,
            "max_bad_fraction": d.max_bad_fraction, "min_words": p.min_words, "max_lines": p.max_lines,
            "heldout_paragraphs": p.heldout_paragraphs, "rows_per_shard": p.rows_per_shard}


def cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Shards:
    """Tokenized Parquet shards on disk. ``tokenized_rows`` is 0 when the cache was reused."""
    path: str
    counts: dict[str, int]
    reports: list[dict]
    tokenized_rows: int

    def summary(self) -> str:
        lines = [LineReport(**r).summary() for r in self.reports]
        how = "reused" if not self.tokenized_rows else f"written ({self.tokenized_rows} rows tokenized)"
        return "\n".join(lines + [f"shards {how}: {self.path} {self.counts}"])

    def dataset(self, kind: str):
        """The shards of one kind, read into the object store before training starts: on 2
        CPUs a streaming read would wait for the CPUs the training workers hold."""
        import ray.data
        return ray.data.read_parquet(f"{self.path}/{kind}").materialize()


def prepare_shards(cfg, tokenizer_source: str) -> Shards:
    """Read, clean, tokenize and write the shards, or reuse them (see the module docstring)."""
    settings = cache_settings(cfg, tokenizer_source)
    key = cache_key(settings)
    root = Path(cfg.pretrain.shard_cache).expanduser() / key
    if (root / "manifest.json").is_file():
        m = json.loads((root / "manifest.json").read_text())
        return Shards(str(root), m["counts"], m["reports"], tokenized_rows=0)
    items, reports = collect_rows(cfg)
    tmp = root.with_name(f"{key}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    counts = write_shards(items, tokenizer_source, cfg.data.max_length, cfg.pretrain.rows_per_shard, tmp)
    manifest = {"counts": counts, "reports": [asdict(r) for r in reports], "settings": settings}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    try:
        tmp.rename(root)                               # atomic: a half-written cache never counts
    except OSError:                                    # another run finished first: use its shards
        shutil.rmtree(tmp, ignore_errors=True)
    return Shards(str(root), counts, manifest["reports"], tokenized_rows=len(items))


def write_shards(items: list[dict], tokenizer_source: str, max_length: int, rows_per_shard: int,
                 out: Path) -> dict[str, int]:
    """One Ray Data pass: tokenize every row, then one Parquet directory per kind."""
    import ray.data
    from ray.data.expressions import col
    blank = {"text_b": "", "text_c": "", "label": 0.0}
    ds = ray.data.from_items([{**blank, **r} for r in items]).map_batches(
        PretrainTokenize, fn_constructor_kwargs={"tokenizer_source": tokenizer_source, "max_length": max_length},
        batch_size=256, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1), num_cpus=1).materialize()
    counts = {}
    for kind in KINDS:
        part = ds.filter(expr=col("kind") == kind).select_columns(["source", *COLUMNS[kind]]).materialize()
        counts[kind] = part.count()
        if counts[kind]:
            part.write_parquet(str(out / kind), max_rows_per_file=rows_per_shard)
    return counts
