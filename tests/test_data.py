"""Readers on the real files and on hand-made bad rows."""
import dataclasses
import re
from pathlib import Path

import pytest

from raymtl.data.multitask import batch_from_rows
from raymtl.data.readers import DataError, read_task_file, split_rows
from raymtl.tasks import TASKS

HEADER = "\tid\tsentence\tsentiment\n"


def write(tmp_path, text: bytes | str, name="f.csv"):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


def test_real_files_read_with_the_quora_malformed_row_reported(data_dir):
    rows, rep = read_task_file(TASKS["quora"], f"{data_dir}/quora/train.tsv")
    assert rep.rows == len(rows) == 22271
    assert rep.bad == [(2, "expected 6 TAB-separated fields, got 5")]
    assert "quora/train.tsv:2:" in rep.summary()
    sst, rep = read_task_file(TASKS["sst"], f"{data_dir}/sst/train.csv")
    assert len(sst) == 8544 and not rep.bad
    assert not sst[0]["text_a"].startswith(" ")  # SST sentences start with a space upstream
    assert {r["label"] for r in sst} == {0.0, 1.0, 2.0, 3.0, 4.0}
    sts, _ = read_task_file(TASKS["sts"], f"{data_dir}/sts/train.csv")
    assert len(sts) == 6040 and all(0 <= r["label"] <= 5 for r in sts)


def test_bad_rows_are_reported_with_line_and_reason(tmp_path):
    good = "".join(f"{i}\tid{i}\tgood sentence {i}\t{i % 5}\n" for i in range(200))
    bad = ("900\tidA\t\t3\n"            # empty text        -> line 202
           "901\tidB\tfine text\t7\n"   # label out of range -> line 203
           "902\tidC\tfine text\n")     # missing field      -> line 204
    path = write(tmp_path, (HEADER + good + bad).encode() + b"903\tidD\tbad \xff byte\t1\n")
    rows, rep = read_task_file(TASKS["sst"], path, max_bad_fraction=0.05)
    assert len(rows) == 200
    reasons = dict(rep.bad)
    assert "empty text" in reasons[202]
    assert "not one of [0, 1, 2, 3, 4]" in reasons[203]
    assert "expected 4 TAB-separated fields, got 3" in reasons[204]
    assert "not valid UTF-8" in reasons[205]


def test_too_many_bad_rows_fail_naming_the_file(tmp_path):
    path = write(tmp_path, HEADER + "0\ta\tok\t1\n1\tb\tok\tnine\n")
    with pytest.raises(DataError, match=r"(?s)f\.csv: 1 of 2 rows are malformed.*f\.csv:3: label 'nine'"):
        read_task_file(TASKS["sst"], path)


def test_the_parallel_prepare_pass_keeps_the_bad_row_contract(ray_cluster, tmp_path, monkeypatch):
    """Every bad row of a task file, found by the parallel pass (ranges of 512 bytes here, so
    many Ray Data tasks), goes to the rejects file as file:line: reason; too many stop the run
    before training, naming the file, the count, the rejects file and the first reasons."""
    import raymtl.data.prepare as prepare
    from raymtl.config import DataConfig, MTLConfig
    from raymtl.data.multitask import prepare_task
    from raymtl.models.encoder import tokenizer_source
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 512)
    good = "".join(f"{i}\tid{i}\tgood sentence {i}\t{i % 5}\n" for i in range(200))
    bad = "900\tidA\t\t3\n901\tidB\tfine text\t7\n902\tidC\tfine text\n"      # lines 202-204
    (tmp_path / "sst").mkdir()
    cut = good.index("\n", 3000) + 1                                         # past a few ranges
    (tmp_path / "sst" / "train.csv").write_bytes((HEADER + good[:cut] + bad + good[cut:]).encode()
                                                 + b"903\tidD\tbad \xff byte\t1\n")
    src = tokenizer_source(MTLConfig().model.encoder)
    d = DataConfig(data_dir=str(tmp_path), tasks=("sst",), cache_dir=str(tmp_path / "cache"), max_bad_fraction=0.05)
    prep = prepare_task(d, "sst", src, None)
    assert prep.counts["train"] + prep.counts["val"] == 200 and prep.counts["val"] == 20
    rejects = Path(prep.path + ".rejects.tsv").read_text().splitlines()
    first_bad = 2 + good[:cut].count("\n")
    assert [r.split(": ", 1)[0].rsplit(":", 1)[1] for r in rejects] == [str(first_bad + i) for i in range(3)] + ["205"]
    assert "empty text" in rejects[0] and "not one of [0, 1, 2, 3, 4]" in rejects[1]
    assert "expected 4 TAB-separated fields, got 3" in rejects[2] and "not valid UTF-8" in rejects[3]
    assert "malformed 1 x empty text" in prep.summary()
    with pytest.raises(DataError, match=r"(?s)train.csv: 4 of 204 lines are malformed, more than "
                                        r"max_bad_fraction=0.01 \(every one in .*rejects.tsv\).*train.csv:"):
        prepare_task(dataclasses.replace(d, max_bad_fraction=0.01), "sst", src, None)
    (tmp_path / "sst" / "train.csv").write_text("\tid\ttext\tsentiment\n0\ta\tok\t1\n")
    with pytest.raises(DataError, match=r"train\.csv:1: missing required column\(s\) \['sentence'\]"):
        prepare_task(d, "sst", src, None)


def test_missing_column_and_missing_file_fail_clearly(tmp_path):
    path = write(tmp_path, "\tid\ttext\tsentiment\n0\ta\tok\t1\n")
    with pytest.raises(DataError, match=r"f\.csv:1: missing required column\(s\) \['sentence'\]"):
        read_task_file(TASKS["sst"], path)
    with pytest.raises(DataError, match="cannot read data file .*nope.csv"):
        read_task_file(TASKS["sst"], str(tmp_path / "nope.csv"))


def test_unlabelled_file_and_bom(tmp_path, data_dir):
    rows, rep = read_task_file(TASKS["sst"], f"{data_dir}/sst/test-unlabeled.csv", with_labels=False)
    assert len(rows) == 2210 and not rep.bad
    path = write(tmp_path, "\ufeff\tid\tsentence1\tsentence2\tsimilarity\n0\tx\ta b\tc d\t2.5\n")
    rows, _ = read_task_file(TASKS["sts"], path)
    assert rows[0]["label"] == 2.5 and rows[0]["text_b"] == "c d"


def test_split_is_seeded_and_disjoint():
    rows = [{"line": i} for i in range(100)]
    tr1, va1 = split_rows(rows, 0.1, 7)
    tr2, va2 = split_rows(rows, 0.1, 7)
    assert va1 == va2 and len(va1) == 10 and len(tr1) == 90
    assert not {r["line"] for r in tr1} & {r["line"] for r in va1}
    assert split_rows(rows, 0.1, 8)[1] != va1


def test_batches_pad_to_their_longest_row():
    from transformers import AutoTokenizer

    from raymtl.models.encoder import default_encoder_path
    tok = AutoTokenizer.from_pretrained(default_encoder_path())
    rows = [{"text_a": "a short one", "text_b": "x", "label": 1.0, "line": 2},
            {"text_a": "a much longer sentence than the first one is", "text_b": "y", "label": 0.0, "line": 3}]
    cross = batch_from_rows(tok, rows, "cross", 128)
    assert cross["input_ids"].shape[1] == int(cross["attention_mask"].sum(1).max())
    assert cross["token_type_ids"][0].max() == 1 and "input_ids_b" not in cross
    bi = batch_from_rows(tok, rows, "bi", 128)
    assert bi["input_ids_b"].shape == (2, 3)  # [CLS] x [SEP]


def test_uri_paths_read_through_pyarrow(data_dir):
    from pathlib import Path
    rows, _ = read_task_file(TASKS["sts"], Path(data_dir, "sts", "train.csv").resolve().as_uri(), max_rows=50)
    assert len(rows) == 50


def test_prepared_task_shards_hold_the_split_and_a_seed_streams_the_same_rows(ray_cluster, data_dir, tmp_path, capsys):
    """The prepare pass carves exactly the rows and split ``read_task_file`` + ``split_rows``
    give; the second run tokenizes nothing; a seed streams the rows in the same order in
    every run (files named in write order; Ray Data keeps the order: configure_ray_data),
    and reshuffles them at every epoch (file order and the seeded local shuffle buffer)."""
    from raymtl.config import smoke
    from raymtl.data.multitask import load_splits
    from raymtl.data.streams import ingest_options
    from raymtl.stages.multitask import prepare_data

    cfg = smoke().replace(data_dir=data_dir, tasks=("sst", "sts"), max_rows=0, cache_dir=str(tmp_path))  # every row
    datasets, sizes = prepare_data(cfg, verbose=True)
    assert "prepared in" in capsys.readouterr().out
    splits, _ = load_splits(cfg.data)
    def lines(ds, seed=None):
        return [int(x) for b in ds.iter_batches(batch_size=256, batch_format="numpy", local_shuffle_seed=seed,
                                                local_shuffle_buffer_size=1024 if seed else None) for x in b["line"]]
    for task in ("sst", "sts"):
        train, val = (sorted(r["line"] for r in part) for part in splits[task])
        epoch1, epoch2 = (lines(datasets[f"train_{task}"], seed) for seed in (1, 2))    # cycle_batches: seed + epoch
        assert sorted(epoch1) == sorted(epoch2) == train and sorted(lines(datasets[f"val_{task}"])) == val
        assert epoch1 != epoch2 and sizes[task] == len(train)     # files and rows reshuffled every epoch
    again, _ = prepare_data(cfg, verbose=True)                              # a second run
    assert "prepare pass skipped" in capsys.readouterr().out
    first = [lines(prepare_data(cfg, verbose=False)[0]["train_sst"], seed) for seed in (1, 2)]
    assert first == [lines(again["train_sst"], seed) for seed in (1, 2)]    # run after run: the same epochs
    assert ingest_options().preserve_order                  # the workers' shards too



def test_a_stream_resumed_past_k_batches_is_the_same_stream_from_its_k_th_batch(ray_cluster):
    """``cycle_batches(skip=k)``: what a resumed run trains on next is what the run never
    stopped would have (the same shuffles, across epoch boundaries)."""
    import itertools

    import ray

    from raymtl.data.streams import cycle_batches
    ds = ray.data.from_items([{"ids_a": list(range(i % 7 + 1)), "line": i} for i in range(40)])
    lines = lambda b: b["line"].tolist()                                   # noqa: E731
    first = list(itertools.islice(cycle_batches(ds, 4, seed=3, bucket=2, collate_fn=lines), 25))   # 2.5 epochs
    assert sorted(sum(first[:10], [])) == list(range(40)) and first[:10] != first[10:20]
    for k in (1, 9, 13):
        resumed = list(itertools.islice(cycle_batches(ds, 4, seed=3, bucket=2, collate_fn=lines, skip=k), 25 - k))
        assert resumed == first[k:]


def test_related_sets_go_through_the_parallel_pass_as_the_reader_reads_them(ray_cluster, data_dir, tmp_path,
                                                                             monkeypatch):
    """A task's related sets are cut into ranges and parsed in Ray Data: the rows, mapped
    labels and label sets are exactly the driver-side reader's (``related_rows``: held-out
    overlap dropped), the overlap is counted in the report, a bad line goes to the rejects
    file, and a line file (MR) is read too."""
    import raymtl.data.prepare as prepare
    from raymtl.config import DataConfig, MTLConfig
    from raymtl.data.multitask import load_splits, prepare_task
    from raymtl.models.encoder import tokenizer_source
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 4096)                       # many ranges per file
    src_dir = Path(data_dir)
    for rel, n in (("sst/train.csv", 400), ("sick/SICK_train.txt", 300), ("sick/SICK_trial.txt", 60),
                   ("mr/rt-polarity.neg", 80), ("mr/rt-polarity.pos", 80)):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"".join((src_dir / rel).read_bytes().splitlines(keepends=True)[:n]))
    sst_rows = (tmp_path / "sst/train.csv").read_bytes().splitlines(keepends=True)
    mr = (tmp_path / "mr/rt-polarity.pos").read_bytes()
    sentences = b"\n".join(r.split(b"\t")[2].strip().lower() for r in sst_rows[1:])   # some are validation rows
    (tmp_path / "mr/rt-polarity.pos").write_bytes(mr + b"\n" + sentences + b"\n")        # and a blank line
    (tmp_path / "sick/SICK_train.txt").write_bytes((tmp_path / "sick/SICK_train.txt").read_bytes()
                                                   + b"9999\ta\tb\t7.5\tNEUTRAL\n")        # score outside 1-5
    src, summaries = tokenizer_source(MTLConfig().model.encoder), {}
    for task, related in (("sst", ("mr",)), ("sts", ("sick",))):
        if task == "sts":
            (tmp_path / "sts").mkdir(exist_ok=True)
            (tmp_path / "sts/train.csv").write_bytes(b"".join(
                (src_dir / "sts/train.csv").read_bytes().splitlines(keepends=True)[:300]))
        d = DataConfig(data_dir=str(tmp_path), tasks=(task,), related_sets=related, cache_dir=str(tmp_path / "cache"))
        prep = prepare_task(d, task, src, None if task == "sst" else "bi")
        summaries[task] = prep.summary()
        expected = sorted((r["line"], round(r["label"], 4), r["label_set"]) for r in load_splits(d)[0][task][2])
        got = prep.dataset("split=related", ["line", "label", "label_set", "ids_a"]).take_all()
        assert sorted((int(r["line"]), round(float(r["label"]), 4), int(r["label_set"])) for r in got) == expected
        assert all(len(r["ids_a"]) > 2 for r in got) and prep.counts["related"] == len(expected)
        assert f"{related[0]} -> {task}: {len(expected)} rows" in prep.summary()
    dropped = re.search(r"skipped (\d+) x text also in sst's validation split or test file", summaries["sst"])
    assert dropped and int(dropped.group(1)) >= 40              # the 40 validation sentences, at least
    rejects = Path(prep.path + ".rejects.tsv").read_text()
    assert "SICK_train.txt:301: score '7.5' in column 'relatedness_score' is outside [1.0, 5.0]" in rejects


def test_prefetched_streams_keep_their_order_raise_where_the_stream_failed_and_stop_on_close():
    from raymtl.data.streams import Prefetched, prefetched

    def failing():
        yield from range(3)
        raise ValueError("row 3 is bad")
    streams = prefetched({"a": iter(range(100)), "b": failing()}, depth=2)
    assert [next(streams["a"]) for _ in range(50)] == list(range(50))     # the stream's own order
    assert [next(streams["b"]) for _ in range(3)] == [0, 1, 2]
    for _ in range(2):                                                    # at the failed item, and after it
        with pytest.raises(ValueError, match="row 3 is bad"):
            next(streams["b"])
    assert list(Prefetched(iter([1, 2]))) == [1, 2]                       # a finite stream ends
    endless = Prefetched(iter(int, 1), depth=1)                           # blocked on its full queue
    assert next(endless) == 0 and endless.thread.is_alive()
    endless.close()
    endless.thread.join(timeout=5)
    assert not endless.thread.is_alive()                                  # close() ended the thread
    for stream in streams.values():
        stream.close()
