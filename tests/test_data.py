"""Readers on the real files and on hand-made bad rows."""
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


def test_tokenized_rows_keep_the_split_order_so_a_seed_gives_the_same_batches(ray_cluster, data_dir):
    """Ray Data hands blocks on in the order its tasks finish unless told to keep the order
    (raymtl.train.trainer.configure_ray_data); then a seed trained on reshuffled rows from run to run."""
    from raymtl.config import smoke
    from raymtl.data.multitask import load_splits
    from raymtl.data.streams import ingest_options
    from raymtl.stages.multitask import prepare_data

    cfg = smoke().replace(data_dir=data_dir, tasks=("sst", "sts"), max_rows=0)   # every row: many blocks
    datasets, _ = prepare_data(cfg, verbose=False)
    splits, _ = load_splits(cfg.data)
    for task in ("sst", "sts"):
        want = [r["line"] for r in splits[task][0]]
        got = [int(x) for b in datasets[f"train_{task}"].iter_batches(batch_size=4096, batch_format="numpy")
               for x in b["line"]]
        assert got == want, task
    assert ingest_options().preserve_order                  # the workers' shards too
