"""Device and precision: batches reach a model only through ``raymtl.models.device.to_device``,
and a bf16 run's checkpoint holds its fp32 master weights and predicts.

A model on the ``meta`` device stands in for a GPU here: a CPU batch that reached it without
the helper fails with ``DeviceMismatch``; one moved by the helper gets past the check (and
then fails for want of real data, which is fine: it reached the model on the right device).
"""
import csv
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoTokenizer

from raymtl.analysis.evaluation import evaluate_rows, predict_batches, row_batches
from raymtl.config import smoke
from raymtl.models.device import DeviceMismatch, check_device, native_bf16, resolve_device, to_device
from raymtl.models.encoder import tokenizer_source
from raymtl.models.multitask import MultiTaskModel

ROWS = [{"id": "a", "line": 2, "text_a": "a fine film", "text_b": "", "label": 3},
        {"id": "b", "line": 3, "text_a": "dull and long", "text_b": "", "label": 1}]


@pytest.fixture(scope="module")
def tiny():
    cfg = smoke()
    model = MultiTaskModel.from_config(cfg.model, ["sst", "sts"])
    return model, AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.encoder))


def test_a_batch_on_another_device_than_the_model_is_refused(tiny):
    model, tok = tiny
    batch = next(row_batches(model, tok, "sst", ROWS, 16))
    model.to("meta")
    try:
        with pytest.raises(DeviceMismatch, match="input_ids.*cpu.*meta"):
            model("sst", batch)
        with pytest.raises(DeviceMismatch):
            check_device(batch, model)
        check_device(to_device(batch, model), model)                # the helper's batch passes
    finally:
        model.to_empty(device="cpu")


@pytest.mark.parametrize("runner", ["predict_batches", "evaluate_rows"])
def test_evaluation_moves_batches_to_the_models_device(tiny, runner):
    model, tok = tiny
    model.to("meta")
    try:
        with pytest.raises(Exception) as err:
            if runner == "predict_batches":
                predict_batches(model, "sst", row_batches(model, tok, "sst", ROWS, 16))
            else:
                evaluate_rows(model, tok, {"sst": ROWS}, 16)
        assert not isinstance(err.value, DeviceMismatch), err.value
    finally:
        model.to_empty(device="cpu")


def test_device_names_resolve_and_a_missing_gpu_is_an_error():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="valid are auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            resolve_device("cuda")
    ok, why = native_bf16(use_gpu=False)
    assert isinstance(ok, bool) and why


BF16_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29563", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from pathlib import Path
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    import raymtl.train.engine as eng
    from raymtl.config import smoke
    from raymtl.models.encoder import tokenizer_source
    from raymtl.models.multitask import MultiTaskModel
    out = Path(sys.argv[1])
    for stage in (0, 2):
        cfg = smoke().replace(zero_stage=stage, num_workers=1, precision="bf16")
        engine = eng.initialize(MultiTaskModel.from_config(cfg.model, ["sst"]), cfg)
        assert engine.module.heads["sst"].out.weight.dtype == torch.bfloat16
        batch = {"input_ids": torch.randint(1000, 2000, (8, 6)), "attention_mask": torch.ones(8, 6, dtype=torch.long),
                 "token_type_ids": torch.zeros(8, 6, dtype=torch.long)}
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(engine("sst", batch).float(), torch.randint(0, 5, (8,)))
            engine.backward(loss)
            engine.step()
        d = out / f"zero{stage}"
        tok = AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.encoder))
        eng.save_checkpoint(engine, d, 3, 0, tok, cfg.to_dict(), {})
        heads = load_file(str(d / "heads.safetensors"))
        enc = load_file(str(d / "encoder" / "model.safetensors"))
        assert {v.dtype for v in [*heads.values(), *enc.values()] if v.is_floating_point()} == {torch.float32}
        assert json.loads((d / "encoder" / "config.json").read_text())["dtype"] == "float32"
        p = engine.module.heads["sst"].out.weight
        master = eng.master_weights(engine)[id(p)]
        if stage > 0:
            assert torch.equal(master, safe_get_full_fp32_param(p).float().cpu())
        else:                                       # ZeRO 0: FP16_UnfusedOptimizer's fp32 copy
            assert any(torch.equal(master, hp) for g in engine.optimizer.fp32_groups for hp in g)
        assert torch.equal(heads["heads.sst.out.weight"], master)            # the master, not the bf16 copy
        assert not torch.equal(master, p.detach().float().cpu())
        again = MultiTaskModel.load(d)
        assert again.heads["sst"].out.weight.dtype == torch.float32
        print(f"zero{stage} fp32 checkpoint")
        # frozen weights (the encoder under train_only_adapters) have no master: saved unrounded
        cfg = cfg.replace(pals=True, pal_tasks=(), train_only_adapters=True)
        model = MultiTaskModel.from_config(cfg.model, ["sst"])
        before = {k: v.detach().clone() for k, v in model.encoder.named_parameters()}
        engine = eng.initialize(model, cfg)
        assert engine.module.encoder.embeddings.word_embeddings.weight.dtype == torch.bfloat16
        loss = torch.nn.functional.cross_entropy(engine("sst", batch).float(), torch.randint(0, 5, (8,)))
        engine.backward(loss)
        engine.step()
        eng.save_checkpoint(engine, out / f"adapters{stage}", 1, 0, tok, cfg.to_dict(), {})
        enc = load_file(str(out / f"adapters{stage}" / "encoder" / "model.safetensors"))
        assert before.keys() <= enc.keys() and all(torch.equal(enc[k], before[k]) for k in before)
        assert not torch.equal(before["embeddings.word_embeddings.weight"].bfloat16().float(),
                               before["embeddings.word_embeddings.weight"])   # rounding would show
        print(f"zero{stage} frozen fp32")
""")


def test_a_bf16_run_checkpoints_fp32_master_weights_that_predict(tmp_path, data_dir):
    proc = subprocess.run([sys.executable, "-c", BF16_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zero0 fp32 checkpoint" in proc.stdout and "zero2 fp32 checkpoint" in proc.stdout
    assert "zero0 frozen fp32" in proc.stdout and "zero2 frozen fp32" in proc.stdout
    from raymtl.cli import main
    pred = tmp_path / "pred.csv"
    assert main(["predict", "--checkpoint", str(tmp_path / "zero0"), "--task", "sst", "--device", "cpu",
                 "--input", f"{data_dir}/sst/test-unlabeled.csv", "--output", str(pred)]) == 0
    rows = list(csv.DictReader(open(pred)))
    assert len(rows) == 2210 and {r["prediction"] for r in rows} <= {"0", "1", "2", "3", "4"}


def test_auto_precision_is_bf16_exactly_where_the_hardware_has_it():
    from raymtl.config import ScaleConfig
    from raymtl.train.engine import deepspeed_config, resolve_precision
    native, why = native_bf16(use_gpu=False)
    precision, reason = resolve_precision(ScaleConfig(precision="auto"))
    assert precision == ("bf16" if native else "fp32") and why in reason
    assert resolve_precision(ScaleConfig(precision="fp32")) == ("fp32", "asked for")
    bf16, said = resolve_precision(ScaleConfig(precision="bf16"))           # kept, with a warning if emulated
    assert bf16 == "bf16" and (said == "asked for" if native else ("WARNING" in said and why in said))
    ds = deepspeed_config(smoke().replace(precision="auto"))
    assert ds["bf16"]["enabled"] is native and ds["fp16"]["enabled"] is False
    with pytest.raises(ValueError, match="precision.*valid"):
        ScaleConfig(precision="bfloat16")
    with pytest.raises(ValueError, match="fp16.*use_gpu"):
        ScaleConfig(precision="fp16")
