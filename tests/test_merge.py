"""``raymtl merge``: task arithmetic and TIES on single-task checkpoints of one base encoder."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import raymtl
from raymtl.methods.merging import merge, task_arithmetic, ties
from raymtl.models.encoder import build_encoder, tokenizer_source
from raymtl.models.multitask import MultiTaskModel


def test_task_arithmetic_and_ties_on_hand_computed_vectors():
    v1, v2 = torch.tensor([1.0, -2.0, 0.1]), torch.tensor([3.0, 1.0, -0.2])
    assert torch.allclose(task_arithmetic([v1, v2], 0.5, 1.0), torch.tensor([2.0, -0.5, -0.05]))
    # density 2/3 keeps two entries of each: [1, -2, 0] and [3, 1, 0]; elected signs +, -, 0;
    # the mean of the agreeing entries: (1 + 3) / 2, -2 (v2's +1 disagrees), nothing
    assert torch.allclose(ties([v1, v2], 1.0, 2 / 3), torch.tensor([2.0, -2.0, 0.0]))
    assert torch.allclose(ties([v1, v2], 0.5, 1.0), 0.5 * torch.tensor([2.0, -2.0, -0.2]))   # sign of -0.1: only -0.2


@pytest.fixture(scope="module")
def singles(tmp_path_factory):
    """A tiny base encoder and two single-task checkpoints fine-tuned (perturbed) from it."""
    root = tmp_path_factory.mktemp("merge")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source("tiny-random"))
    base = build_encoder("tiny-random", seed=0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    out = {}
    for i, task in enumerate(("sst", "sts")):
        model = MultiTaskModel(build_encoder(str(root / "base")), [task], {"sts": "bi"}, source=str(root / "base"))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.save(root / task, tokenizer, extra={"max_length": 32})
        out[task] = root / task
    return root, out


def test_merged_checkpoint_is_base_plus_scaled_task_vectors_and_keeps_the_heads(singles, tmp_path):
    root, ck = singles
    merged = merge([ck["sst"], ck["sts"]], tmp_path / "ta", method="task_arithmetic", scale=0.5, say=lambda m: None)
    base = build_encoder(str(root / "base")).state_dict()
    parts = {t: MultiTaskModel.load(ck[t]) for t in ck}
    m = MultiTaskModel.load(merged)
    key = "encoder.layer.0.attention.self.query.weight"
    want = base[key] + 0.5 * sum(parts[t].encoder.state_dict()[key] - base[key] for t in ck)
    assert torch.allclose(m.encoder.state_dict()[key], want, atol=1e-6)
    for t in ck:                                                     # heads carried over unchanged
        for k, v in parts[t].heads[t].state_dict().items():
            assert torch.equal(m.heads[t].state_dict()[k], v)
    assert json.loads((merged / "merge.json").read_text())["method"] == "task_arithmetic"
    loaded = raymtl.load(merged, device="cpu")                       # usable by predict / evaluate
    assert loaded.tasks == ["sst", "sts"]
    assert set(loaded.predict("sst", ["fine", "dull"])) <= set(range(5))
    assert np.isfinite(loaded.predict("sts", [("a cat", "a dog")])).all()
    t = merge([ck["sst"], ck["sts"]], tmp_path / "ties", method="ties", density=0.2, say=lambda m: None)
    ties_w = MultiTaskModel.load(t).encoder.state_dict()[key]
    assert not torch.allclose(ties_w, want) and (ties_w != base[key]).float().mean() < 0.45   # trimmed: most stay at base


def test_merge_refuses_what_cannot_be_merged(singles, tmp_path):
    root, ck = singles
    with pytest.raises(ValueError, match="task 'sst' has a head in both"):
        merge([ck["sst"], ck["sst"]], tmp_path / "a", say=lambda m: None)
    other = MultiTaskModel(build_encoder("tiny-random", seed=1), ["quora"], {"quora": "bi"}, source="tiny-random")
    other.save(tmp_path / "other", AutoTokenizer.from_pretrained(tokenizer_source("tiny-random")))
    with pytest.raises(ValueError, match="fine-tuned from different base encoders"):
        merge([ck["sst"], tmp_path / "other"], tmp_path / "b", say=lambda m: None)
    with pytest.raises(ValueError, match="merge method 'mean': valid are"):
        merge([ck["sst"], ck["sts"]], tmp_path / "c", method="mean", say=lambda m: None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        merge([ck["sst"], ck["sts"]], tmp_path / "full", say=lambda m: None)


def test_raymtl_merge_on_the_command_line(singles, tmp_path, capsys):
    from raymtl.cli import main
    _, ck = singles
    assert main(["merge", str(ck["sst"]), str(ck["sts"]), "--output", str(tmp_path / "m"), "--method", "ties",
                 "--density", "0.5"]) == 0
    assert "merged 2 checkpoints (sst, sts) by ties (scale 1, density 0.5)" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "merge.json").read_text())["density"] == 0.5
    assert main(["merge", str(ck["sst"]), str(ck["sst"]), "--output", str(tmp_path / "n")]) == 2
    assert "task 'sst' has a head in both" in capsys.readouterr().err
