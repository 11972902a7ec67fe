"""Further pre-training: masking statistics, SimCSE losses by hand, reading and reporting the
raw files, cross-worker negatives under real Ray Train, the shard cache, and an end-to-end
smoke run whose checkpoint the multi-task stage loads."""
import dataclasses
import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from raymtl.config import field_owners
from raymtl.data.corpus import NliParser, WikiParser, clean_wiki, nli_triplets
from raymtl.data.prepare import LineReport, check_bad_fraction
from raymtl.data.readers import DataError
from raymtl.models.pretrain import PretrainModel, has_mlm_head
from raymtl.objectives.pretrain import IGNORE, info_nce, mask_tokens, simcse_sup_loss, simcse_unsup_loss
from raymtl.stages.pretrain import PretrainJobConfig, PretrainStage, head_warmup_config, pretrain_smoke

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- config
def test_config_section_names_are_unique_and_bad_values_name_the_field():
    owners = field_owners(PretrainJobConfig.SECTIONS)
    assert owners["simcse_temperature"] == "pretrain" and owners["lr"] == "train"
    assert len(owners) == sum(len(k.__dataclass_fields__) for k in PretrainJobConfig.SECTIONS.values())
    for overrides, message in [({"simcse_temperature": 0.0}, "simcse_temperature=0.0 must be > 0"),
                               ({"mlm_mask_prob": 1.0}, r"mlm_mask_prob=1.0 must be in \(0, 1\)"),
                               ({"num_workers": 2, "sup_batch_size": 5}, "sup_batch_size=5 must be divisible"),
                               ({"pals": True}, "pals, task_prefix, task_layers and train_only_adapters belong"),
                               ({"task_layers": {"sst": 1}}, "task_layers and train_only_adapters belong"),
                               ({"head_warmup_steps": 2, "mlm_weight": 0.0}, "head_warmup_steps=2 warms up the MLM head"),
                               ({"head_warmup_steps": -1}, "head_warmup_steps=-1 must be >= 0"),
                               ({"train_only_head": True}, "train_only_head=True freezes the encoder, which SimCSE")]:
        with pytest.raises(ValueError, match=message):
            pretrain_smoke().replace(**overrides)
    # the frozen encoder keeps its fp32 values in a bf16 run (tests/test_device.py), so this is allowed
    pretrain_smoke().replace(train_only_head=True, simcse_unsup_weight=0.0, simcse_sup_weight=0.0, precision="bf16")
    import argparse

    from raymtl.cli import add_config_args, config_from_args
    from raymtl.recipes import pretrain as pretrain_defaults
    p = argparse.ArgumentParser()
    add_config_args(p, PretrainJobConfig.SECTIONS)
    cfg = config_from_args(p.parse_args(["--smoke", "--mlm-weight", "0.5", "--nli-files", "a.jsonl"]),
                           defaults=pretrain_defaults, shrink=pretrain_smoke)
    assert cfg.model.encoder == "tiny-random" and cfg.pretrain.mlm_weight == 0.5
    assert cfg.pretrain.nli_files == ("a.jsonl",) and cfg.run.name == "pretrain"
    # a nested config (a --config file) that leaves sections out gets the stage's own defaults
    # for them (the plain encoder, the summed loss), not the multi-task stage's
    nested = PretrainJobConfig.from_dict({"pretrain": {"mlm_weight": 0.5}, "train": {"lr": 1e-4}})
    assert (nested.model.pals, nested.train.fusion, nested.run.name) == (False, "sum", "pretrain")
    assert nested == PretrainJobConfig().replace(mlm_weight=0.5, lr=1e-4)


def test_the_head_warmup_config_trains_only_the_head_of_its_own_run():
    cfg = pretrain_smoke().replace(head_warmup_steps=5, name="pt", precision="bf16")
    warm = head_warmup_config(cfg)
    assert (warm.run.name, warm.train.steps, warm.train.eval_every, warm.scale.precision) == ("pt-head", 5, 5, "bf16")
    assert warm.pretrain.weights() == {"mlm": 1.0, "simcse_unsup": 0.0, "simcse_sup": 0.0}
    assert warm.pretrain.train_only_head and warm.pretrain.head_warmup_steps == 0
    model = PretrainStage(warm, {"mlm": 1}).build_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mlm_head.") for n in trainable)
    assert not model.encoder.get_input_embeddings().weight.requires_grad     # the tied output matrix
    assert all(p.requires_grad for p in PretrainStage(cfg, {"mlm": 1}).build_model().parameters())


def test_an_encoder_with_a_trained_mlm_head_skips_the_warmup(tmp_path, capsys):
    cfg = pretrain_smoke().replace(head_warmup_steps=5, name="pt")
    assert PretrainStage.upstream(cfg).pretrain.train_only_head          # a fresh head: warmed up first
    model = PretrainModel("tiny-random", seed=3)
    model.save(tmp_path / "ckpt")                                        # a pre-training checkpoint
    assert has_mlm_head(str(tmp_path / "ckpt")) and not has_mlm_head("tiny-random")
    state = torch.random.get_rng_state()
    assert PretrainStage.upstream(cfg.replace(init_from=str(tmp_path / "ckpt"))) is None
    assert torch.equal(torch.random.get_rng_state(), state)
    assert "has a trained MLM head: no head warm-up" in capsys.readouterr().out
    (tmp_path / "ckpt" / "mlm_head.safetensors").unlink()                # its encoder alone: no head
    assert not has_mlm_head(str(tmp_path / "ckpt"))


# ------------------------------------------------------------------------------- masking
def test_masking_statistics_and_special_tokens_are_never_masked():
    stage = PretrainStage(pretrain_smoke(), {"mlm": 1})
    stage.build_model()
    g = torch.Generator().manual_seed(0)
    B, T = 400, 64
    ids = torch.randint(1000, 30000, (B, T), generator=g)
    lengths = torch.randint(10, T, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()              # (B, T)
    ids[:, 0], ids[torch.arange(B), lengths - 1] = 101, 102                  # [CLS] ... [SEP]
    ids = ids * mask                                                          # [PAD] = 0
    out = stage.masked({"input_ids": ids, "attention_mask": mask}, g)
    inputs, labels = out["input_ids"], out["mlm_labels"]
    target = labels != IGNORE
    eligible = (mask == 1) & ~torch.isin(ids, torch.tensor([0, 100, 101, 102, 103]))
    assert not (target & ~eligible).any()                                    # never a special / pad
    assert (labels[target] == ids[target]).all() and (inputs[~target] == ids[~target]).all()
    assert target.sum() / eligible.sum() == pytest.approx(0.15, abs=0.01)
    n = target.sum().item()
    to_mask = (inputs[target] == 103).sum().item() / n
    kept = (inputs[target] == ids[target]).sum().item() / n
    assert to_mask == pytest.approx(0.8, abs=0.02) and kept == pytest.approx(0.1, abs=0.015)
    assert 1 - to_mask - kept == pytest.approx(0.1, abs=0.015)               # a random token
    # dynamic: a second draw masks other positions
    again = mask_tokens(ids, ~eligible, 103, 30522, 0.15)[1] != IGNORE
    assert (again != target).any()


# ------------------------------------------------------------------------------- SimCSE
def test_simcse_identical_pairs_give_the_minimum():
    import itertools
    z = torch.eye(4, 8)                                                      # 4 orthonormal sentences
    # identical views: cross-entropy's minimum, 0, up to e^(-1/tau) terms
    assert 0 <= simcse_unsup_loss(z, z.clone()).item() < 1e-6
    # by hand at tau = 0.5: each positive has cosine 1, each of the 3 negatives cosine 0
    best = simcse_unsup_loss(z, z.clone(), 0.5).item()
    assert best == pytest.approx(math.log(1 + 3 * math.exp(-2.0)), rel=1e-5)
    for perm in itertools.permutations(range(4)):                            # every other pairing is worse
        if perm != (0, 1, 2, 3):
            assert simcse_unsup_loss(z, z[list(perm)], 0.5).item() > best
    losses = []                                                              # positives turned away by theta
    for theta in (0.0, 0.3, 0.6, 0.9):
        turned = math.cos(theta) * z + math.sin(theta) * torch.roll(z, 4, dims=1)   # into unused dimensions
        losses.append(simcse_unsup_loss(z, turned, 0.5).item())
    assert losses[0] == pytest.approx(best) and losses == sorted(losses) and len(set(losses)) == 4
    tau = 0.5
    # supervised, by hand: keys are 4 positives and 4 negatives; an opposite hard negative
    # (cosine -1) costs less than the 6 orthogonal keys; one equal to the positive is a coin flip
    assert simcse_sup_loss(z, z, -z, tau).item() == pytest.approx(
        math.log(1 + 6 * math.exp(-1 / tau) + math.exp(-2 / tau)), rel=1e-5)
    assert simcse_sup_loss(z, z, z).item() == pytest.approx(math.log(2), abs=1e-6)
    # temperature: cosine 0.5 against 0 at tau=0.5 -> -log(e / (e + 1))
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 3 ** 0.5], [0.0, 1.0]])                          # cos(q0, k0) = 0.5
    assert info_nce(two[:1], keys, torch.tensor([0]), 0.5).item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-5)


def gather_on_worker(config):
    """Each of 2 ranks holds its own (B, H) views; returns what rank 0 gathers of everything."""
    import ray.train
    import torch.distributed as dist

    from raymtl.objectives.pretrain import gather_with_grad, simcse_unsup_loss
    rank = ray.train.get_context().get_world_rank()
    z1 = torch.tensor(config["z1"][rank], requires_grad=True)
    z2 = torch.tensor(config["z2"][rank], requires_grad=True)
    keys, offset = gather_with_grad(z2)
    loss = simcse_unsup_loss(z1, z2, 0.05)
    loss.backward()
    mine = {"rank": rank, "keys": keys.tolist(), "offset": offset, "loss": loss.item(),
            "grad_z2": z2.grad.tolist(), "keys_require_grad": keys.requires_grad}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return parts


def test_negatives_are_gathered_across_two_workers_with_local_gradients(ray_cluster, tmp_path):
    import sys

    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)   # rank -> (B=3, H=4)
    result = TorchTrainer(
        gather_on_worker, train_loop_config={"z1": z1.tolist(), "z2": z2.tolist()},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path), name="gather")).fit()
    for part in result.return_value:
        r = part["rank"]
        assert part["offset"] == 3 * r and part["keys_require_grad"]
        assert torch.allclose(torch.tensor(part["keys"]), z2.reshape(6, 4))       # 6 keys = 2 workers x 3
        # reference on one process: the other rank's keys are constants, this rank's are variables
        q, k = z1[r].clone().requires_grad_(), z2[r].clone().requires_grad_()
        keys = torch.cat([k if i == r else z2[i] for i in range(2)])
        ref = info_nce(q, keys, 3 * r + torch.arange(3), 0.05)
        ref.backward()
        assert part["loss"] == pytest.approx(ref.item(), rel=1e-5)
        assert torch.allclose(torch.tensor(part["grad_z2"]), k.grad, atol=1e-6) and k.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- reading
def test_wiki_and_nli_lines_are_cleaned_and_every_unused_line_is_reported(tmp_path):
    """The prepare pass's parsers, line by line (the pass itself: test_second_prepare_reuses_the_cache)."""
    wiki = WikiParser(min_words=4, seed=0, threshold=-1)          # threshold -1: nothing held out
    lines = [b" = Heading = ", b" ", b" The value is 1 @,@ 000 and state @-@ of @-@ the @-@ art . "
             b"A second sentence is here . Too short .", b" Bad \xff byte line here", b" Too short"]
    out = {n: wiki.parse("wiki.txt", n, raw) for n, raw in enumerate(lines, start=1)}
    assert out[1] == ("heading", False) and out[2] == ("blank line", False)
    assert out[4] == ("not valid UTF-8 (byte 5)", True)
    assert out[5] == ("fewer than 4 words (list item, caption)", False)
    paragraph, *sentences = out[3]
    assert paragraph == {"kind": "mlm", "source": "wiki.txt:3", "text":
                         "The value is 1,000 and state-of-the-art . A second sentence is here . Too short ."}
    assert [r["text"] for r in sentences if r["kind"] == "simcse_unsup"] == [
        "The value is 1,000 and state-of-the-art .", "A second sentence is here ."]
    assert sentences[-1]["kind"] == "_skipped" and sentences[-1]["reason"].startswith("sentence of fewer than 4")
    assert clean_wiki(" 0 @.@ 7 kg ") == "0.7 kg"
    held = WikiParser(min_words=4, seed=0, threshold=2**64)       # every paragraph held out, no sentences
    assert [r["kind"] for r in held.parse("wiki.txt", 3, lines[2])] == ["mlm_val"]

    report = LineReport("wiki.txt", lines=5)
    report.add("not valid UTF-8 (byte 5)", 4, malformed=True)
    with pytest.raises(DataError, match=r"wiki.txt: 1 of 5 lines are malformed.*every one in rejects.tsv"):
        check_bad_fraction(report, 0.1, "rejects.tsv")

    nli = NliParser()
    raw = [b'{"premise": "P one", "hypothesis": "yes", "label": "entailment"}',
           b'{"premise": "P one", "hypothesis": "no", "label": "contradiction"}',
           b'{"premise": "P one", "hypothesis": "maybe", "label": "neutral"}',
           b'{"premise": "P one", "hypothesis": "no 2", "label": "contradiction"}',
           b'{"premise": "P two", "hypothesis": "yes", "label": "entailment"}',
           b'{"premise": "P three", "hypothesis": "x"', b'{"premise": "P four", "hypothesis": "x", "label": "-"}']
    parsed = {n: nli.parse("nli.jsonl", n, r) for n, r in enumerate(raw, start=1)}
    assert parsed[3] == ("neutral hypothesis (not used)", False)
    assert parsed[6][1] and parsed[6][0].startswith("not valid JSON") and "label '-' is not one of" in parsed[7][0]
    rows = [r for n in (1, 2, 4, 5) for r in parsed[n]]
    groups = {}
    for r in rows:
        groups.setdefault(r["premise"], []).append(r)
    columns = ("kind", "source", "reason", "count", "premise", "hypothesis", "label_name", "line")
    out = [nli_triplets({k: np.array([r.get(k, 1 if k == "count" else "") for r in g], dtype=object) for k in columns})
           for g in groups.values()]           # as Ray Data's groupby("premise").map_groups hands them on
    triplets = [(t, b, c) for o in out for k, t, b, c in zip(o["kind"], o["text"], o["text_b"], o["text_c"])
                if k == "simcse_sup"]
    assert triplets == [("P one", "yes", "no"), ("P one", "yes", "no 2")]
    skipped = [(k, s, r) for o in out for k, s, r in zip(o["kind"], o["source"], o["reason"]) if k == "_skipped"]
    assert skipped == [("_skipped", "nli.jsonl:5", "premise has no contradiction hypothesis")]


# ------------------------------------------------------------------------------- shards
def test_second_prepare_reuses_the_cache(ray_cluster, data_dir, tmp_path):
    from raymtl.data.corpus import cache_key, cache_settings, prepare_shards
    from raymtl.models.encoder import tokenizer_source
    bad = tmp_path / "nli.jsonl"
    good = Path(data_dir, "nli/snli.jsonl").read_text().splitlines()[:60]
    bad.write_text("\n".join(good[:30] + ["{oops"] + good[30:]) + "\n")
    cfg = pretrain_smoke().replace(data_dir=data_dir, cache_dir=str(tmp_path / "cache"), max_lines=120,
                                   nli_files=(str(bad),), max_bad_fraction=0.05)
    src = tokenizer_source(cfg.model.encoder)
    first = prepare_shards(cfg, src)
    assert first.tokenized and set(first.counts) == {"mlm", "mlm_val", "simcse_unsup", "simcse_sup", "sts_val"}
    assert first.counts["sts_val"] == 24 and first.counts["mlm_val"] >= cfg.pretrain.heldout_paragraphs
    assert "nli.jsonl:31" in first.summary() and "not valid JSON" in first.summary()
    rejects = Path(first.path + ".rejects.tsv").read_text().splitlines()
    assert len(rejects) == 1 and rejects[0].startswith(f"{bad}:31: not valid JSON")
    second = prepare_shards(cfg, src)
    assert not second.tokenized and second.path == first.path and second.counts == first.counts
    assert "nli.jsonl:31" in second.summary() and "prepare pass skipped" in second.summary()   # reports survive
    ids = first.dataset("simcse_sup").take(1)[0]
    assert {"ids_a", "ids_b", "ids_c", "source"} == set(ids) and ids["ids_a"][0] == 101
    again = prepare_shards(cfg.replace(force_prepare=True), src)        # --force-prepare
    assert again.tokenized and again.counts == first.counts and again.path == first.path
    key = cache_key(cache_settings(cfg, src))
    assert cache_key(cache_settings(cfg.replace(max_length=64), src)) != key
    assert cache_key(cache_settings(cfg.replace(mlm_weight=0.5), src)) == key    # weights do not change rows
    bad.write_text("\n".join(good[:20] + ["{oops"] * 5 + good[20:]) + "\n")  # other bytes: another key
    with pytest.raises(DataError, match=r"nli.jsonl: 5 of 65 lines are malformed, more than max_bad_fraction=0.05 "
                                        r"\(every one in .*rejects.tsv\)"):
        prepare_shards(cfg, src)


def test_a_saved_hugging_face_dataset_goes_through_the_same_prepare_pass(ray_cluster, data_dir, tmp_path):
    """``hf:DIR[:SPLIT]`` (a ``save_to_disk`` directory; ``hf:NAME`` on the hub takes the same
    path): rows are its ``text`` column, reported as ``hf:...:<row>``."""
    import datasets

    from raymtl.data.corpus import prepare_shards
    from raymtl.models.encoder import tokenizer_source
    lines = Path(data_dir, "wikitext-2/valid.txt").read_text().splitlines()[:150]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": lines})}).save_to_disk(str(tmp_path / "wiki"))
    cfg = pretrain_smoke().replace(data_dir=data_dir, cache_dir=str(tmp_path / "cache"), max_lines=0,
                                   wiki_files=(f"hf:{tmp_path / 'wiki'}:train",), nli_files=(), simcse_sup_weight=0.0)
    shards = prepare_shards(cfg, tokenizer_source(cfg.model.encoder))
    wiki = shards.reports[0]
    assert wiki["path"] == f"hf:{tmp_path / 'wiki'}:train" and wiki["lines"] == 150
    held = {r["source"] for r in shards.dataset("mlm_val").take_all()}              # paragraphs, in chunks
    assert shards.counts["mlm"] > 0 and len(held) == cfg.pretrain.heldout_paragraphs
    assert wiki["skipped"]["heading"][1][0] == 2                    # row 2 of the text column: " = Homarus gammarus = "


# ------------------------------------------------------------------------------- end to end
def test_smoke_stage_runs_after_its_head_warmup_and_its_checkpoint_starts_the_multitask_stage(ray_cluster, data_dir,
                                                                                              tmp_path):
    from transformers import AutoTokenizer

    from raymtl.analysis.evaluation import evaluate_rows
    from raymtl.data.multitask import load_splits
    from raymtl.models.multitask import MultiTaskModel
    from raymtl.train.trainer import fit
    cfg = pretrain_smoke().replace(data_dir=data_dir, output=str(tmp_path / "runs"), cpus_per_worker=1.0,
                                   cache_dir=str(tmp_path / "cache"), head_warmup_steps=4)
    summary = fit(cfg, verbose=False)
    m = summary.metrics
    # the head warm-up ran first, in its own run: the head learned, the frozen encoder embeds as before,
    # and the stage started from exactly its weights
    warm = json.loads((tmp_path / "runs" / "pretrain-head" / "best_metrics.json").read_text())
    assert warm["step"] == 4 and warm["mlm_loss"] < warm["mlm_loss_step0"]
    assert warm["sts_zero_shot"] == pytest.approx(warm["sts_zero_shot_step0"], abs=1e-6)
    assert m["mlm_loss_step0"] == pytest.approx(warm["mlm_loss"], abs=1e-4)
    assert m["sts_zero_shot_step0"] == pytest.approx(warm["sts_zero_shot"], abs=1e-6)
    assert json.loads((Path(summary.best_checkpoint) / "config.json").read_text())["model"]["init_from"] == \
        warm["best_checkpoint"]
    assert m["step"] == 12 and m["start_step"] == 0
    assert {"mlm_loss", "mlm_perplexity", "sts_zero_shot", "mlm_loss_step0", "sts_zero_shot_step0",
            "train_loss_mlm", "train_loss_simcse_unsup", "train_loss_simcse_sup"} <= set(m)
    assert m["mlm_perplexity"] == pytest.approx(math.exp(m["mlm_loss"]))
    assert m["mlm_loss"] < m["mlm_loss_step0"] and np.isfinite(m["train_loss"])
    ckpt = Path(summary.best_checkpoint)
    assert (ckpt / "encoder" / "model.safetensors").is_file() and (ckpt / "mlm_head.safetensors").is_file()

    # the checkpoint loads as a multi-task model with fresh heads, and gives the same zero-shot STS
    model = MultiTaskModel.load(ckpt, tasks=["sst", "quora", "sts"]).eval()
    assert list(model.heads) == ["sst", "quora", "sts"] and model.modes["sts"] == "bi"
    _, val = load_splits(dataclasses.replace(cfg.data, tasks=("sts",)))[0]["sts"]
    tok = AutoTokenizer.from_pretrained(ckpt / "encoder")
    again = evaluate_rows(model, tok, {"sts": val}, cfg.data.max_length)["sts"]
    assert again == pytest.approx(m["sts_zero_shot"], abs=1e-5)

    # jobs/mtl.py --init-from CKPT trains from it
    main = runpy.run_path(str(ROOT / "jobs" / "mtl.py"), run_name="mtl_job")["main"]
    assert main(["--smoke", "--init-from", str(ckpt), "--data-dir", data_dir, "--output", str(tmp_path / "mtl"),
                 "--steps", "2", "--eval-every", "2", "--max-rows", "120", "--cpus-per-worker", "1"]) == 0

    # re-running with the same output and name resumes (more steps: on purpose), keeping the before-training scores
    # (the finished head warm-up is read back, not trained again)
    warm_checkpoints = sorted((tmp_path / "runs" / "pretrain-head").glob("checkpoint_*"))
    more = fit(cfg.replace(steps=14, resume_changed="continue"), verbose=False).metrics
    assert more["start_step"] == 12 and more["step"] == 14
    assert sorted((tmp_path / "runs" / "pretrain-head").glob("checkpoint_*")) == warm_checkpoints
    assert more["sts_zero_shot_step0"] == m["sts_zero_shot_step0"]


def test_validation_masks_do_not_depend_on_batch_order_or_padding():
    stage = PretrainStage(pretrain_smoke(), {"mlm": 1})
    stage.build_model()
    rows = [np.arange(1000, 1000 + n) for n in (30, 12, 45, 20)]
    rows = [np.concatenate([[101], r, [102]]) for r in rows]
    from raymtl.stages.pretrain import collate_pretrain
    one = stage.fixed_masks(collate_pretrain({"ids_a": np.array(rows, dtype=object)}))
    other = stage.fixed_masks(collate_pretrain({"ids_a": np.array(rows[::-1][:2], dtype=object)}))
    for i, j in ((3, 0), (2, 1)):                                           # same rows, other batch
        n = len(rows[i])
        assert torch.equal(one["mlm_labels"][i, :n], other["mlm_labels"][j, :n])
        assert torch.equal(one["input_ids"][i, :n], other["input_ids"][j, :n])
    assert (one["mlm_labels"] != IGNORE).any()
