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
