"""The padding-free forward equals Hugging Face's padded one: outputs, gradients, PALs, prefixes."""
import pytest
import torch

from raymtl.config import ModelConfig
from raymtl.models.multitask import MultiTaskModel
from raymtl.models.unpad import Packing, supports_unpadding, unpadded_forward

TASKS = ["sst", "quora", "sts"]


def ragged_batch(pair=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 3, 1, 6, 2, 9]
    ids = torch.randint(1000, 2000, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    ids = ids * mask
    b = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    if pair:
        b.update(input_ids_b=ids.flip(0), attention_mask_b=mask.flip(0))
    return b


def outputs_and_grads(model, task, batch):
    model.zero_grad()
    out = model(task, batch)
    (out.float() ** 2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("extras", [
    {"pals": False, "task_layers": {}},
    {"pals": True, "pal_tasks": (), "pal_rank": 8, "pal_heads": 2},
    {"pals": True, "pal_tasks": ("sts",), "pal_rank": 8, "pal_heads": 2, "task_prefix": "learned"},
    {"pals": False, "pair_mode": {"quora": "cross", "sts": "cross"}},
    {"pals": True, "pal_tasks": ("sst",), "pal_rank": 8, "pal_heads": 2, "task_layers": {"sst": 1, "sts": 2}},
], ids=["plain", "pals", "sts-pals+prefix", "cross", "own-layers+pals"])
def test_unpadded_model_equals_the_padded_one(extras):
    model = MultiTaskModel.from_config(ModelConfig(encoder="tiny-random", **extras), TASKS, seed=0).eval()
    assert model.unpad
    for p in getattr(model, "pals", torch.nn.ModuleDict()).parameters():   # fresh PALs add zero
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():                          # fresh own layers equal the shared ones
        for p in model.task_layers.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    for task in TASKS:
        batch = ragged_batch(pair=task != "sst")
        model.unpad = True
        out, grads = outputs_and_grads(model, task, batch)
        model.unpad = False
        ref, ref_grads = outputs_and_grads(model, task, batch)
        assert torch.allclose(out, ref, atol=1e-5), (task, (out - ref).abs().max())
        assert grads.keys() == ref_grads.keys() and len(grads) > 10
        for name, g in grads.items():
            assert torch.allclose(g, ref_grads[name], atol=1e-5, rtol=1e-4), (task, name)


def test_pals_change_only_their_task_in_the_unpadded_forward():
    model = MultiTaskModel.from_config(
        ModelConfig(encoder="tiny-random", pals=True, pal_tasks=("sts",), pal_rank=8, pal_heads=2), TASKS).eval()
    b = ragged_batch()
    before = {t: model.embed(t, b["input_ids"], b["attention_mask"]) for t in ("sst", "sts")}
    torch.nn.init.normal_(model.pals["sts"].dec.weight, std=0.2)
    assert torch.equal(model.embed("sst", b["input_ids"], b["attention_mask"]), before["sst"])
    assert not torch.allclose(model.embed("sts", b["input_ids"], b["attention_mask"]), before["sts"], atol=1e-4)


def test_roberta_is_unpadded_and_other_encoders_fall_back():
    from transformers import DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel
    torch.manual_seed(0)
    roberta = RobertaModel(RobertaConfig(vocab_size=3000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64), add_pooling_layer=False).eval()
    assert supports_unpadding(roberta)
    b = ragged_batch()
    b["input_ids"] = torch.where(b["attention_mask"] > 0, b["input_ids"], roberta.config.pad_token_id)
    ref = roberta(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    packed, packing = unpadded_forward(roberta, b["attention_mask"], input_ids=b["input_ids"])
    assert packed.shape == (int(b["attention_mask"].sum()), 32)
    assert torch.allclose(packed, packing.pack(ref), atol=1e-5)
    distil = DistilBertModel(DistilBertConfig(vocab_size=3000, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    assert not supports_unpadding(distil)
    assert not MultiTaskModel(distil, ["sst"], {}).unpad            # Hugging Face's own forward instead


def test_packing_round_trip():
    mask = ragged_batch()["attention_mask"]
    p = Packing(mask)
    x = torch.randn(*mask.shape, 4)
    packed = p.pack(x)
    assert packed.shape == (int(mask.sum()), 4)
    back = p.unpack(packed)
    assert torch.equal(back[mask.bool()], x[mask.bool()])
    assert torch.equal(back[~mask.bool()], torch.zeros_like(x[~mask.bool()]))
    assert torch.equal(p.padding, mask == 0)


def test_no_unpad_flag_selects_hugging_faces_forward():
    import argparse

    from raymtl.cli import add_config_args, config_from_args
    p = argparse.ArgumentParser()
    add_config_args(p)
    assert config_from_args(p.parse_args(["--smoke"])).model.unpad
    cfg = config_from_args(p.parse_args(["--smoke", "--no-unpad"]))
    assert not cfg.model.unpad
    assert not MultiTaskModel.from_config(cfg.model, TASKS).unpad


def test_pretraining_model_unpadded_equals_padded():
    from raymtl.models.pretrain import PretrainModel
    model = PretrainModel("tiny-random", seed=0).eval()
    assert model.unpad
    b = ragged_batch()
    labels = torch.full_like(b["input_ids"], -100)
    labels[b["attention_mask"].bool()] = b["input_ids"][b["attention_mask"].bool()]
    labels[:, 1::2] = -100
    b["mlm_labels"] = labels
    outs = {}
    for unpad in (True, False):
        model.unpad = unpad
        outs[unpad] = (model("embed", b), model("mlm", b))
    for x, y in zip(outs[True], outs[False]):
        assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5)
