"""PALs and task prefixes: exact key sets, identity at init, freezing, checkpoint round trip."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from raymtl.config import ModelConfig, MTLConfig
from raymtl.models.multitask import MultiTaskModel, part_of, saved_parts
from raymtl.models.pals import PALConfig, pal_state_dict
from raymtl.recipes import PLAIN_ENCODER

TASKS = ["sst", "quora", "sts"]


def tiny(**kw):
    return MultiTaskModel.from_config(ModelConfig(encoder="tiny-random", **kw), TASKS, seed=0).eval()


def batch(pair=False):
    ids = torch.tensor([[101, 2023, 2003, 102, 0], [101, 2307, 102, 0, 0]])
    b = {"input_ids": ids, "attention_mask": (ids > 0).long(), "token_type_ids": torch.zeros_like(ids)}
    if pair:
        b.update(input_ids_b=ids, attention_mask_b=(ids > 0).long())
    return b


def test_pal_keys_and_fresh_pals_leave_outputs_unchanged():
    plain, pals = tiny(pals=False), tiny(pals=True, pal_tasks=(), pal_rank=8, pal_heads=2)   # every task
    pals.encoder.load_state_dict(plain.encoder.state_dict())
    pals.heads.load_state_dict(plain.heads.state_dict())
    keys = set(pal_state_dict(pals))
    layers = plain.encoder.config.num_hidden_layers
    expected = {f"pals.{t}.{w}.weight" for t in TASKS for w in ("enc", "dec")}
    for t in TASKS:
        for i in range(layers):
            expected |= {f"pals.{t}.layers.{i}.attn.{k}" for k in
                         ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")}
    assert keys == expected
    assert torch.allclose(plain("sst", batch()), pals("sst", batch()), atol=1e-6)


def test_only_adapters_train_and_the_round_trip_restores_them(tmp_path):
    m = tiny(pals=True, pal_tasks=(), pal_rank=8, pal_heads=2, train_only_adapters=True)
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"heads", "pals", "task_layers"}             # the default: SST's own top layer
    with torch.no_grad():
        for p in m.pals.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = m("sts", batch(pair=True))
    m.save(tmp_path)
    back = MultiTaskModel.load(tmp_path).eval()
    assert back.pal_settings == {"rank": 8, "heads": 2}
    assert torch.allclose(back("sts", batch(pair=True)), before, atol=1e-6)


def test_default_pals_are_for_sts_only(tmp_path):
    plain, sts_only = tiny(pals=False), tiny(pal_rank=8, pal_heads=2)          # the default: STS only
    assert set(sts_only.pals) == {"sts"}
    assert {k.split(".")[1] for k in pal_state_dict(sts_only)} == {"sts"}
    sts_only.encoder.load_state_dict(plain.encoder.state_dict())
    sts_only.heads.load_state_dict(plain.heads.state_dict())
    with torch.no_grad():
        for p in sts_only.pals.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert torch.allclose(plain("sst", batch()), sts_only("sst", batch()), atol=1e-6)   # no PAL: plain encoder
    b = batch()
    assert not torch.allclose(plain.embed("sts", b["input_ids"], b["attention_mask"]),
                              sts_only.embed("sts", b["input_ids"], b["attention_mask"]), atol=1e-4)
    sts_only.save(tmp_path)
    back = MultiTaskModel.load(tmp_path).eval()
    assert back.pal_settings == {"rank": 8, "heads": 2, "tasks": ["sts"]} and set(back.pals) == {"sts"}
    assert torch.allclose(back.embed("sts", b["input_ids"], b["attention_mask"]),
                          sts_only.embed("sts", b["input_ids"], b["attention_mask"]), atol=1e-6)
    sst_only = MultiTaskModel.load(tmp_path, tasks=["sst"]).eval()    # e.g. --tasks sst --init-from it
    assert sst_only.pal_settings is None and not hasattr(sst_only, "pals")
    assert torch.allclose(sst_only("sst", b), sts_only("sst", b), atol=1e-6)


@pytest.mark.parametrize("kind", ["learned", "text"])
def test_task_prefixes(kind, tmp_path):
    m = tiny(task_prefix=kind, prefix_length=3)
    out = m("sst", batch())
    assert out.shape == (2, 5)
    if kind == "learned":
        assert set(m.prefix.vectors) == set(TASKS) and m.prefix.vectors["sst"].shape == (3, 32)
        m.save(tmp_path)
        assert torch.allclose(MultiTaskModel.load(tmp_path).eval()("sst", batch()), out, atol=1e-6)
    else:
        assert m.text_prefix("quora") == "quora : " and m.prefix is None


def test_bad_adapter_settings_are_refused():
    with pytest.raises(ValueError, match="pal_rank=10 must be a positive multiple of pal_heads=4"):
        ModelConfig(pals=True, pal_rank=10, pal_heads=4)
    with pytest.raises(ValueError, match="train_only_adapters=True needs pals=True"):
        ModelConfig(pals=False, task_layers={}, train_only_adapters=True)
    with pytest.raises(ValueError, match="pal_tasks='nli' is not valid"):
        ModelConfig(pals=True, pal_tasks=("nli",))
    with pytest.raises(ValueError, match=r"none of tasks=\['quora'\] is in pal_tasks=\['sts'\] "
                                         r"or task_layers=\{'sst': 'half'\}"):
        MTLConfig().replace(tasks=("quora",), train_only_adapters=True)
    MTLConfig().replace(tasks=("sst",), train_only_adapters=True)          # SST's own layers train


def test_pal_defaults_are_the_component_s():
    assert (ModelConfig().pal_rank, ModelConfig().pal_heads) == (PALConfig().rank, PALConfig().heads) == (96, 8)


def test_pal_tasks_apply_to_the_trained_tasks():
    cfg = MTLConfig()                                  # the multi-task default
    assert cfg.model.pals and cfg.model.pal_tasks == ("sts",)
    assert cfg.model.pal_settings() == {"rank": 96, "heads": 8, "tasks": ["sts"]}
    assert cfg.model.pal_tasks_of(["sst"]) == [] and cfg.model.pal_tasks_of(["sst", "sts"]) == ["sts"]
    assert cfg.replace(pal_tasks=()).model.pal_tasks_of(["sst", "sts"]) == ["sst", "sts"]   # empty: every task
    assert cfg.replace(pals=False).model.pal_settings() is None
    assert set(MultiTaskModel.from_config(ModelConfig(encoder="tiny-random", pal_rank=8, pal_heads=2),
                                          ["sst", "sts"]).pals) == {"sts"}
    single = MultiTaskModel.from_config(ModelConfig(encoder="tiny-random"), ["sst"])   # a single-task SST run
    assert single.pal_settings is None and not hasattr(single, "pals")


def test_task_pooling_gives_one_task_its_own_read_out_and_survives_the_round_trip(tmp_path):
    mean, per_task = tiny(pals=False), tiny(pals=False, task_pooling={"sst": "cls"})
    per_task.load_state_dict(mean.state_dict())
    b = batch()
    hidden = mean.encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    sst = per_task.embed("sst", b["input_ids"], b["attention_mask"])
    assert torch.allclose(sst, hidden[:, 0], atol=1e-5)                          # [CLS] for SST
    assert not torch.allclose(sst, mean.embed("sst", b["input_ids"], b["attention_mask"]), atol=1e-3)
    assert torch.equal(per_task.embed("sts", b["input_ids"], b["attention_mask"]),   # mean for the others
                       mean.embed("sts", b["input_ids"], b["attention_mask"]))
    per_task.save(tmp_path)
    back = MultiTaskModel.load(tmp_path, tasks=TASKS, task_pooling={"sts": "cls"}).eval()   # saved heads keep theirs
    assert back.task_pooling == {"sst": "cls"}
    assert torch.allclose(back("sst", b), per_task("sst", b), atol=1e-6)
    sst_only = MultiTaskModel.from_config(ModelConfig(encoder="tiny-random", pals=False, task_pooling={"sst": "cls"}),
                                          ["sst"], seed=0)
    sst_only.save(tmp_path / "sst")
    grown = MultiTaskModel.load(tmp_path / "sst", tasks=["sst", "quora"], task_pooling={"sst": "mean", "quora": "cls"})
    assert grown.task_pooling == {"sst": "cls", "quora": "cls"}                   # a new head takes the asked one


def test_own_top_layers_belong_to_their_task_and_survive_the_round_trip(tmp_path):
    plain, own = tiny(pals=False, task_layers={}), tiny(pals=False, task_layers={"sst": 1})
    own.load_state_dict({**own.state_dict(), **plain.state_dict()})
    b, pair = batch(), batch(pair=True)
    assert torch.allclose(own("sst", b), plain("sst", b), atol=1e-6)     # copies of the top layer
    with torch.no_grad():
        for p in own.task_layers.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert not torch.allclose(own("sst", b), plain("sst", b), atol=1e-4)
    assert torch.equal(own("sts", pair), plain("sts", pair))              # the others: shared layers
    own.zero_grad()
    own("sst", b).sum().backward()
    reached = {n.split(".")[3] for n, p in own.named_parameters() if p.grad is not None and n.startswith("encoder.encoder.layer.")}
    assert reached == {"0"}                             # SST trains its own top layer, not the shared one
    assert all(p.grad is not None for p in own.task_layers["sst"].parameters())
    own.save(tmp_path)
    back = MultiTaskModel.load(tmp_path).eval()
    assert back.meta()["task_layers"] == {"sst": 1}
    assert torch.allclose(back("sst", b), own("sst", b), atol=1e-6)
    grown = MultiTaskModel.load(tmp_path, task_layers={"sts": 1}).eval()  # a task without them gets copies
    assert grown.meta()["task_layers"] == {"sst": 1, "sts": 1}
    assert torch.allclose(grown("sts", pair), back("sts", pair), atol=1e-6)
    with pytest.raises(ValueError, match="has 1 own layer\\(s\\) for sst; task_layers asks 2 \\(2\\): "
                                         "pass task_layers sst=1"):
        MultiTaskModel.load(tmp_path, task_layers={"sst": 2})
    assert MultiTaskModel.load(tmp_path, task_layers={"sst": "half"}).meta()["task_layers"] == {"sst": 1}
    with pytest.raises(ValueError, match="task_layers\\[sst\\]=3 must be at most the encoder's 2 layers"):
        tiny(task_layers={"sst": 3})


def test_the_default_gives_sst_its_own_top_half_when_sst_is_trained():
    assert tiny().meta()["task_layers"] == {"sst": 1}                   # half of tiny-random's 2 layers
    assert tiny(task_layers={"sst": "half", "sts": 2}).meta()["task_layers"] == {"sst": 1, "sts": 2}
    six = BertConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=37)
    model = MultiTaskModel(BertModel(six, add_pooling_layer=False), list(TASKS), {"quora": "bi", "sts": "bi"},
                           task_layers={"sst": "half"})
    assert len(model.task_layers["sst"]) == 3                            # MiniLM-L6's depth: 3 of 6
    no_sst = MultiTaskModel.from_config(ModelConfig(encoder="tiny-random"), ["quora", "sts"], seed=0)
    assert no_sst.meta()["task_layers"] == {}                            # only for a trained task
    assert ModelConfig().task_layers == {"sst": "half"}
    assert ModelConfig(**PLAIN_ENCODER).task_layers == {} and PLAIN_ENCODER["task_layers"] == {}


def test_own_parameters_are_each_task_s_head_pals_and_own_layers():
    model = tiny(pal_rank=8, pal_heads=2, task_prefix="learned")      # default: SST's own layer, STS PALs
    names = {id(p): n for n, p in model.named_parameters()}
    own = {t: {names[id(p)].split(".")[0] for p in ps} for t, ps in model.own_parameters().items()}
    assert own == {"sst": {"heads", "task_layers"}, "quora": {"heads"}, "sts": {"pals"}}   # cosine: no head weights
    counted = sum(len(ps) for ps in model.own_parameters().values())
    assert counted == sum(1 for n, _ in model.named_parameters() if n.split(".")[0] in ("heads", "pals", "task_layers"))


def test_a_checkpoint_loads_exactly_what_its_raymtl_json_describes(tmp_path):
    model = tiny(pal_rank=8, pal_heads=2, task_prefix="learned")       # SST's own layer, STS PALs, prefixes
    b, pair = batch(), batch(pair=True)
    model.save(tmp_path)
    file, meta = tmp_path / "heads.safetensors", json.loads((tmp_path / "raymtl.json").read_text())
    good = load_file(str(file))
    assert {part_of(k) for k in good} == saved_parts(meta) - {("heads", "sts")}   # a cosine head: no weights
    own_layer = next(k for k in good if k.startswith("task_layers.sst."))
    for dropped in ("pals.sts.enc.weight", "heads.sst.out.bias", "prefix.vectors.quora", own_layer):
        save_file({k: v for k, v in good.items() if k != dropped}, str(file))
        with pytest.raises(ValueError, match=rf"{re.escape(str(file))} lacks \['{re.escape(dropped)}'\], "
                                             r"which .*raymtl.json says the checkpoint has"):
            MultiTaskModel.load(tmp_path)
    for extra in ("heads.sst.out.scale", "pals.sst.enc.weight", "heads.mnli.out.weight", "weighting.log_var"):
        save_file({**good, extra: torch.zeros(1)}, str(file))
        with pytest.raises(ValueError, match=rf"{re.escape(str(file))} holds \['{re.escape(extra)}'\], "
                                             r"which .*raymtl.json does not describe"):
            MultiTaskModel.load(tmp_path)
    save_file(good, str(file))
    back = MultiTaskModel.load(tmp_path).eval()
    assert torch.allclose(back("sst", b), model("sst", b), atol=1e-6)
    assert torch.allclose(back("sts", pair), model("sts", pair), atol=1e-6)


def test_tasks_and_adapters_the_checkpoint_lacks_start_fresh(tmp_path):
    sst_only = MultiTaskModel.from_config(ModelConfig(encoder="tiny-random", **PLAIN_ENCODER), ["sst"], seed=0).eval()
    sst_only.save(tmp_path)
    grown = MultiTaskModel.load(tmp_path, tasks=TASKS, pals={"rank": 8, "heads": 2, "tasks": ["sts"]},
                                task_prefix="learned", task_layers={"quora": 1}).eval()
    assert set(grown.heads) == set(TASKS) and set(grown.pals) == {"sts"} and set(grown.prefix.vectors) == set(TASKS)
    assert grown.meta()["task_layers"] == {"quora": 1}
    assert torch.equal(grown.heads["sst"].out.weight, sst_only.heads["sst"].out.weight)   # the one it has
    assert not torch.count_nonzero(grown.pals["sts"].dec.weight)                          # a fresh PAL
