"""Pre-training data: WikiText and NLI lines -> tokenized Parquet shards, cached.

``prepare_shards(cfg)`` runs the prepare pass (``raymtl.data.prepare``) over the raw files
(local paths, URIs, or ``hf:NAME[:CONFIG[:SPLIT]]`` / ``hf:DIR[:SPLIT]`` for a Hugging Face
data set's ``text`` column): every byte range of a file is one Ray Data task that cleans its
lines, tokenizes them and writes them out. Held-out Wiki paragraphs are the
``heldout_paragraphs`` with the smallest seeded hash of their ``file:line`` (a first, cheap
pass finds the threshold), so no global shuffle is needed; NLI lines are grouped by premise
(a Ray Data ``groupby``) into triplets. One Parquet directory per kind of row::

    <cache_dir>/pretrain-<key>/kind=mlm/            Wiki paragraphs, in chunks of <= max_length tokens
    <cache_dir>/pretrain-<key>/kind=mlm_val/        held-out Wiki paragraphs (MLM loss / perplexity)
    <cache_dir>/pretrain-<key>/kind=simcse_unsup/   Wiki sentences of the training paragraphs
    <cache_dir>/pretrain-<key>/kind=simcse_sup/     NLI triplets (premise, entailment, contradiction)
    <cache_dir>/pretrain-<key>/kind=sts_val/        the STS validation split carved as in jobs/mtl.py
    <cache_dir>/pretrain-<key>/manifest.json        row counts, the line reports, the settings hashed
    <cache_dir>/pretrain-<key>.rejects.tsv          every malformed line, as file:line: reason

``key`` hashes the input bytes, the tokenizer (its full definition) and every setting that
changes the rows, so a second run reads the shards instead of tokenizing again. Every line
not used is counted by reason and reported as ``file:line``; malformed lines (bad JSON,
unknown label, non-UTF-8) count against ``max_bad_fraction``.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from raymtl.data.multitask import load_splits
from raymtl.data.prepare import (
    LineReport,
    Parser,
    Prepared,
    cached,
    check_bad_fraction,
    collect_reports,
    count_rows,
    line_ranges,
    parse_pass,
    per_process,
    range_lines,
    ranges_dataset,
    sha256_of,
    tokenizer_fingerprint,
    write_parts,
)
from raymtl.data.readers import DataError, text_line

KINDS = ("mlm", "mlm_val", "simcse_unsup", "simcse_sup", "sts_val")
COLUMNS = {"mlm": ["ids_a"], "mlm_val": ["ids_a"], "simcse_unsup": ["ids_a"],
           "simcse_sup": ["ids_a", "ids_b", "ids_c"], "sts_val": ["ids_a", "ids_b", "label"]}
HEADING = re.compile(r"^=+ .* =+$")
JOIN = re.compile(r" @(\S)@ ")                      # "1 @,@ 000" -> "1,000", "a @-@ b" -> "a-b"
SENTENCE_END = re.compile(r"(?<= [.!?]) +")          # WikiText separates final punctuation
NLI_LABELS = ("entailment", "neutral", "contradiction")
SHORT_SENTENCE = "sentence of fewer than {} words (not for SimCSE)"       # of a used paragraph, not a line
EMPTY = np.zeros(0, np.int32)


# ------------------------------------------------------------------------------- parsing
def clean_wiki(text: str) -> str:
    """Undo WikiText's tokenization joins; ``<unk>`` stays (the tokenizer maps it)."""
    return re.sub(r"\s+", " ", JOIN.sub(r"\1", f" {text.strip()} ")).strip()


def split_sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(paragraph) if s.strip()]


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




def resolve(data_dir: str, path: str) -> str:
    return path if path.startswith(("hf:", "/")) or "://" in path else f"{data_dir.rstrip('/')}/{path}"


def paragraph_hash(seed: int, source: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{source}".encode(), digest_size=8).digest(), "big")


# ------------------------------------------------------------------------------- parsers
class Tokens:
    """The tokenizer, loaded once per Ray Data actor: truncated sequences and MLM chunks."""

    def __init__(self, tokenizer_source: str, max_length: int):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(tokenizer_source)
        self.tok.model_max_length = 10**9            # paragraphs are chunked, not truncated
        self.max_length = max_length

    def encode(self, texts) -> list[np.ndarray]:
        if not texts:
            return []
        texts = [str(t).replace("<unk>", self.tok.unk_token) for t in texts]
        return [np.asarray(x, np.int32) for x in
                self.tok(texts, truncation=True, max_length=self.max_length)["input_ids"]]

    def chunks(self, texts) -> list[list[np.ndarray]]:
        """Each text as chunks of at most ``max_length`` tokens ([CLS] ... [SEP])."""
        if not texts:
            return []
        n, cls, sep = self.max_length - 2, self.tok.cls_token_id, self.tok.sep_token_id
        ids = self.tok([str(t).replace("<unk>", self.tok.unk_token) for t in texts],
                       add_special_tokens=False)["input_ids"]
        return [[np.asarray([cls, *x[i:i + n], sep], np.int32) for i in range(0, max(len(x), 1), n)]
                for x in ids]


class WikiParser(Parser):
    """WikiText lines: a paragraph is MLM chunks (``mlm``, or ``mlm_val`` when held out) and,
    when trained on, its sentences for unsupervised SimCSE; blank lines, headings and short
    paragraphs are skipped by design."""
    columns = {"ids_a": EMPTY}

    def __init__(self, tokenizer_source: str = "", max_length: int = 128, min_words: int = 4,
                 seed: int = 0, threshold: int = -1):
        self.tokens = Tokens(tokenizer_source, max_length) if tokenizer_source else None
        self.min_words, self.seed, self.threshold = min_words, seed, threshold

    def paragraph(self, line: int, raw: bytes) -> str | tuple[str, bool]:
        text = text_line(raw)
        if isinstance(text, tuple):
            return text
        if HEADING.match(text):
            return "heading", False
        text = clean_wiki(text)
        if len(text.split()) < self.min_words:
            return f"fewer than {self.min_words} words (list item, caption)", False
        return text

    def parse(self, path, line, raw):
        text = self.paragraph(line, raw)
        if isinstance(text, tuple):
            return text
        source = f"{path}:{line}"
        if paragraph_hash(self.seed, source) <= self.threshold:
            return [{"kind": "mlm_val", "source": source, "text": text}]
        rows = [{"kind": "mlm", "source": source, "text": text}]
        for sentence in split_sentences(text):
            rows.append({"kind": "simcse_unsup", "source": source, "text": sentence}
                        if len(sentence.split()) >= self.min_words else
                        {"kind": "_skipped", "source": source, "reason": SHORT_SENTENCE.format(self.min_words)})
        return rows

    def tokenize(self, rows):
        mlm = [r for r in rows if r["kind"] in ("mlm", "mlm_val")]
        for r, ids in zip(mlm, self.tokens.chunks([r["text"] for r in mlm])):
            r["chunks"] = ids
        sentences = [r for r in rows if r["kind"] == "simcse_unsup"]
        for r, ids in zip(sentences, self.tokens.encode([r["text"] for r in sentences])):
            r["ids_a"] = ids
        return [c for r in rows for c in ([{**r, "ids_a": x} for x in r["chunks"]] if "chunks" in r else [r])]


class NliParser(Parser):
    """NLI JSON lines -> ``_nli`` rows (premise, hypothesis, label), grouped into triplets
    later (``nli_triplets``); neutral hypotheses and blank lines are skipped by design."""
    columns = {"premise": "", "hypothesis": "", "label_name": "", "line": 0}

    def parse(self, path, line, raw):
        if not raw.strip():
            return "blank line", False
        try:
            premise, hypothesis, label = parse_nli(raw)
        except ValueError as e:
            return str(e), True
        if label == "neutral":
            return "neutral hypothesis (not used)", False
        return [{"kind": "_nli", "source": f"{path}:{line}", "premise": premise, "hypothesis": hypothesis,
                 "label_name": label, "line": line}]

    def tokenize(self, rows):
        return rows


def nli_triplets(group: dict[str, np.ndarray]) -> dict[str, list]:
    """One premise's hypotheses -> max(e, c) triplets, the shorter list reused in file order;
    a premise lacking either kind gives none (each of its lines counted as skipped). Other
    outcome rows (``_bad``, ``_skipped``: premise "") pass through."""
    keep = ("kind", "source", "reason", "count")
    out = {k: [] for k in (*keep, "text", "text_b", "text_c")}

    def emit(**row):
        for k in out:
            out[k].append(row.get(k, 1 if k == "count" else ""))
    rows = [dict(zip(group, v)) for v in zip(*group.values())]
    for r in rows:
        if r["kind"] != "_nli":
            emit(**{k: r[k] for k in keep})
    nli = sorted((r for r in rows if r["kind"] == "_nli"), key=lambda r: (str(r["source"]).rsplit(":", 1)[0], r["line"]))
    pos = [r for r in nli if r["label_name"] == "entailment"]
    neg = [r for r in nli if r["label_name"] == "contradiction"]
    if nli and not (pos and neg):
        for r in nli:
            emit(kind="_skipped", source=r["source"],
                 reason="premise has no " + ("contradiction" if pos else "entailment") + " hypothesis")
    elif nli:
        for j in range(max(len(pos), len(neg))):
            p, c = pos[j % len(pos)], neg[j % len(neg)]
            emit(kind="simcse_sup", source=p["source"], text=p["premise"], text_b=p["hypothesis"],
                 text_c=c["hypothesis"])
    return out


def tokenize_triplets(batch: dict[str, np.ndarray], tokens: tuple[type, dict]) -> dict[str, list]:
    """Ray Data ``map_batches`` function: the triplets' three texts -> ids; outcome rows pass."""
    tok = per_process(tokens)
    idx = [i for i, k in enumerate(batch["kind"]) if k == "simcse_sup"]
    out = {k: list(batch[k]) for k in ("kind", "source", "reason", "count")}
    for col, text in (("ids_a", "text"), ("ids_b", "text_b"), ("ids_c", "text_c")):
        ids = dict(zip(idx, tok.encode([batch[text][i] for i in idx])))
        out[col] = [ids.get(i, EMPTY) for i in range(len(batch["kind"]))]
    return out


# ------------------------------------------------------------------------------- the pass
def heldout_threshold(ranges: list[dict], n: int, min_words: int, seed: int) -> int:
    """The hash of the ``n``-th Wiki paragraph in hash order (a parse-only pass over every range)."""
    def smallest(batch):
        parser = WikiParser(min_words=min_words)
        hashes = [paragraph_hash(seed, f"{path}:{line}") for path, s, e, f in zip(
            batch["path"], batch["start"], batch["end"], batch["first_line"])
            for line, raw in range_lines({"path": path, "start": s, "end": e, "first_line": f})
            if not isinstance(parser.paragraph(line, raw), tuple)]
        return {"h": np.asarray(heapq.nsmallest(n + 1, hashes), np.uint64)}
    found = sorted(int(r["h"]) for r in ranges_dataset(ranges).map_batches(smallest, batch_size=1).take_all())
    if len(found) <= n:
        raise DataError(f"only {len(found)} Wiki paragraphs; heldout_paragraphs={n} leaves none to train on")
    return found[n - 1]


def cache_settings(cfg, tokenizer_source: str) -> dict:
    """Everything the shards depend on: inputs (by content), tokenizer, and settings."""
    p, d = cfg.pretrain, cfg.data
    files = [resolve(d.data_dir, f) for f in (*p.wiki_files, *p.nli_files)] + [resolve(d.data_dir, "sts/train.csv")]
    return {"tokenizer": tokenizer_fingerprint(tokenizer_source),
            "files": [[f, sha256_of(f)] for f in files], "max_length": d.max_length,   # in order
            "split_seed": d.split_seed, "val_fraction": d.val_fraction, "max_rows": d.max_rows,
            "max_bad_fraction": d.max_bad_fraction, "min_words": p.min_words, "max_lines": p.max_lines,
            "heldout_paragraphs": p.heldout_paragraphs, "rows_per_shard": p.rows_per_shard}


def cache_key(settings: dict) -> str:
    from raymtl.data.prepare import FORMAT_VERSION
    return hashlib.sha256(json.dumps({"version": FORMAT_VERSION, **settings}, sort_keys=True).encode()).hexdigest()[:16]


class Shards(Prepared):
    """The pre-training shards; ``dataset(kind)`` streams one kind."""

    def dataset(self, kind: str, seed: int | None = None, in_memory: bool = False):
        return super().dataset(f"kind={kind}", columns=["source", *COLUMNS[kind]], seed=seed, in_memory=in_memory)


def prepare_shards(cfg, tokenizer_source: str, force: bool = False) -> Shards:
    """Read, clean, tokenize and write the shards, or reuse them (see the module docstring)."""
    p, d = cfg.pretrain, cfg.data

    def build(tmp: Path, rejects: Path):
        reports: dict[str, LineReport] = {}

        def ranges_of(files) -> list[dict]:              # every file's ranges; its line count reported
            out = []
            for f in files:
                path = resolve(d.data_dir, f)
                ranges, lines = line_ranges(path, max_lines=p.max_lines)
                reports[path] = LineReport(path, lines=lines)
                out += ranges
            return out
        wiki = ranges_of(p.wiki_files)
        threshold = heldout_threshold(wiki, p.heldout_paragraphs, p.min_words, d.split_seed)
        wiki_parser = (WikiParser, {"tokenizer_source": tokenizer_source, "max_length": d.max_length,
                                    "min_words": p.min_words, "seed": d.split_seed, "threshold": threshold})
        write_parts(parse_pass(ranges_dataset(wiki), wiki_parser), tmp / "wiki", p.rows_per_shard)
        nli = ranges_of(p.nli_files)
        if nli:
            triplets = (parse_pass(ranges_dataset(nli), (NliParser, {}))
                        .groupby("premise").map_groups(nli_triplets, batch_format="numpy")
                        .map_batches(tokenize_triplets, batch_size=1024, num_cpus=1, fn_kwargs={
                            "tokens": (Tokens, {"tokenizer_source": tokenizer_source, "max_length": d.max_length})}))
            write_parts(triplets, tmp / "nli", p.rows_per_shard)
        for part in ("wiki", "nli"):
            if (tmp / part).is_dir():
                collect_reports(tmp / part, reports, rejects)
        for path, r in reports.items():
            r.rows = r.lines - r.n_bad() - sum(n for reason, (n, _) in r.skipped.items()
                                               if reason != SHORT_SENTENCE.format(p.min_words))
            check_bad_fraction(r, d.max_bad_fraction, str(rejects))
        sts, sts_report = sts_rows(cfg, tokenizer_source)
        reports[sts_report.path] = sts_report
        write_table(tmp / "sts" / "kind=sts_val", sts)
        for part in ("wiki", "nli", "sts"):              # one directory per kind at the top
            for k in (tmp / part).glob("kind=*") if (tmp / part).is_dir() else []:
                if not k.name.startswith("kind=_"):
                    k.rename(tmp / k.name)
        counts = {k: count_rows(tmp, k) for k in KINDS}
        return counts, list(reports.values()), []

    prepared = cached(d.cache_dir, "pretrain", cache_settings(cfg, tokenizer_source), force or d.force_prepare, build)
    return Shards(**prepared.__dict__)


def write_table(out: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "part-0.parquet")


def sts_rows(cfg, tokenizer_source: str) -> tuple[list[dict], LineReport]:
    """The STS validation split, carved exactly as the multi-task stage carves it, tokenized."""
    splits, (read,) = load_splits(replace(cfg.data, tasks=("sts",), related_sets=()))
    train, val = splits["sts"]
    report = LineReport(read.path, lines=read.rows + len(read.bad), rows=len(val))
    report.add("row of the multi-task training split (not used here)", min(r["line"] for r in train),
               count=len(train))
    for line, reason in read.bad:
        report.add(reason, line, malformed=True)
    tokens = Tokens(tokenizer_source, cfg.data.max_length)
    ids_a, ids_b = tokens.encode([r["text_a"] for r in val]), tokens.encode([r["text_b"] for r in val])
    rows = [{"source": f"{read.path}:{r['line']}", "ids_a": a.tolist(), "ids_b": b.tolist(), "label": float(r["label"])}
            for r, a, b in zip(val, ids_a, ids_b)]
    return rows, report
