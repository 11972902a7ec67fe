"""``raymtl.load``: a checkpoint used from Python, the same path as ``raymtl predict``."""
import csv

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import raymtl
from raymtl.cli import main
from raymtl.config import smoke
from raymtl.models.encoder import tokenizer_source
from raymtl.models.multitask import MultiTaskModel


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = smoke()
    model = MultiTaskModel.from_config(cfg.model, ["sst", "quora", "sts"])
    with torch.no_grad():                       # trained PALs: fresh ones leave the output unchanged
        for name, p in model.named_parameters():
            if name.startswith("pals."):
                p.normal_(0, 0.2)
    d = tmp_path_factory.mktemp("ckpt")
    model.save(d, AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.encoder)), extra={"max_length": 32})
    return d


def test_load_predicts_encodes_and_compares(checkpoint):
    m = raymtl.load(checkpoint, device="cpu")
    assert m.tasks == ["sst", "quora", "sts"] and m.device.type == "cpu" and m.max_length == 32
    sst = m.predict("sst", ["a gripping, funny film", "dull and far too long", "fine"])
    assert sst.dtype == np.int64 and sst.shape == (3,) and set(sst) <= set(range(5))
    pairs = [("How do I learn Python?", "What is the best way to learn Python?"), ("Is it raining?", "Who won?")]
    assert set(m.predict("quora", pairs)) <= {0, 1}
    sts = m.predict("sts", pairs)
    assert sts.dtype.kind == "f" and ((0 <= sts) & (sts <= 5)).all()
    emb = m.encode(["a cat sat", "a dog ran", "stocks fell"], task="sts")
    plain = m.encode(["a cat sat", "a dog ran", "stocks fell"])
    assert emb.shape == plain.shape == (3, 32) and not np.allclose(emb, plain)    # STS has PALs: its own view
    sim = m.similarity(["a cat sat", "a dog ran"], ["a cat sat", "stocks fell"])
    assert sim[0] == pytest.approx(1.0, abs=1e-5) and sim[1] < 1.0
    # sentence-level STS score is a linear map of the same cosine (the cosine head)
    assert np.argsort(m.predict("sts", [("a cat sat", "a cat sat"), ("a dog ran", "stocks fell")]))[-1] == 0


def test_wrong_shapes_of_input_are_refused(checkpoint):
    m = raymtl.load(checkpoint, device="cpu")
    with pytest.raises(ValueError, match="pair task"):
        m.predict("quora", ["just one sentence"])
    with pytest.raises(ValueError, match="single sentences"):
        m.predict("sst", [("a", "b")])
    with pytest.raises(ValueError, match="heads for"):
        m.predict("mrpc", ["x"])


def test_the_cli_predicts_what_the_api_predicts(checkpoint, data_dir, tmp_path):
    out = tmp_path / "pred.csv"
    assert main(["predict", "--checkpoint", str(checkpoint), "--task", "sst", "--device", "cpu",
                 "--input", f"{data_dir}/sst/test-unlabeled.csv", "--output", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    from raymtl.data.readers import read_task_file
    from raymtl.tasks import TASKS
    src, _ = read_task_file(TASKS["sst"], f"{data_dir}/sst/test-unlabeled.csv", with_labels=False,
                            max_bad_fraction=0.0, allow_empty_text=True)
    api = raymtl.load(checkpoint, device="cpu").predict("sst", [r["text_a"] for r in src])
    assert [int(r["prediction"]) for r in rows] == list(api)


def test_predict_counts_truncated_and_mostly_unknown_rows(checkpoint, data_dir):
    from raymtl.api import InputStats
    m = raymtl.load(checkpoint, device="cpu")
    assert m.last_stats is None
    real = [line.split("\t")[2] for line in open(f"{data_dir}/sst/train.csv", encoding="utf-8").read().split("\n")[1:]
            if line]
    long_row = " ".join(" ".join(real).split()[:5000])                       # 5,000 words of real SST text
    unknown = "🜁🜂 ☃ ⛬"                                                     # every token is [UNK] here
    rows = [real[0], long_row, unknown, "🜁 a good film", "dull"]    # real[0]: 49 tokens; then 1 [UNK] in 4
    sst = m.predict("sst", rows)
    assert sst.dtype == np.int64 and sst.shape == (5,)                      # the same arrays as before
    assert m.last_stats == InputStats(rows=5, truncated=2, mostly_unk=1, max_length=32, unk_token="[UNK]")
    assert m.last_stats.summary() == "predicted 5 rows (2 truncated to 32 tokens, 1 mostly [UNK])"
    pairs = [("How do I learn Python?", long_row), (unknown, "☃ ☃ ok"), ("Is it raining?", "Who won?")]
    for task in ("quora", "sts"):                                           # a pair counts once
        m.predict(task, pairs)
        assert (m.last_stats.rows, m.last_stats.truncated, m.last_stats.mostly_unk) == (3, 1, 1), task
    assert m.input_stats("sst", []) == InputStats(0, 0, 0, 32, "[UNK]")


def test_predict_says_what_it_truncated_in_one_line(checkpoint, data_dir, tmp_path, capsys):
    lines = open(f"{data_dir}/sst/test-unlabeled.csv", encoding="utf-8").read().split("\n")[:4]
    long_row = " ".join(["film"] * 5000)
    src = tmp_path / "sst-test.csv"
    src.write_text("\n".join(lines + [f"3\t3.0\tlongid\t{long_row}", "4\t4.0\tunkid\t🜁🜂 ☃ ⛬"]) + "\n")
    out = tmp_path / "pred.csv"
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), "--task", "sst", "--device", "cpu",
                 "--input", str(src), "--output", str(out)]) == 0
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[raymtl]")]
    assert err == [f"[raymtl] predicted 5 rows (1 truncated to 32 tokens, 1 mostly [UNK]) -> {out}"]
    assert [r["id"] for r in csv.DictReader(open(out))][-2:] == ["longid", "unkid"]
