"""DeepSpeed checkpoints (ZeRO 0-3) save and reload through raymtl's engine with
``weights_only`` loading, and a checkpoint file carrying arbitrary pickled code is refused.

Runs in a subprocess: DeepSpeed initialises a (1-process, gloo) process group, which must
not leak into the pytest process that later drives Ray.
"""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, pickle, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from pathlib import Path
    import raymtl.train.engine as eng
    from raymtl.config import smoke
    from raymtl.models.multitask import MultiTaskModel
    out = Path(sys.argv[1])
    import deepspeed
    from raymtl.methods.weighting import make_weighting
    dwa = make_weighting("dwa", ["sst", "quora"], {}, dwa_window=1)
    for step in range(4):                                          # three finished windows of losses
        dwa({"sst": torch.tensor(1.0 / (step + 1)), "quora": torch.tensor(0.5)}, step)
    for stage in (0, 1, 2, 3):
        cfg = smoke().replace(zero_stage=stage, num_workers=1, fusion="sum")
        model = MultiTaskModel.from_config(cfg.model, ["sst"])
        engine = eng.initialize(model, cfg)
        batch = {"input_ids": torch.randint(1000, 2000, (8, 6)), "attention_mask": torch.ones(8, 6, dtype=torch.long),
                 "token_type_ids": torch.zeros(8, 6, dtype=torch.long)}
        loss = torch.nn.functional.cross_entropy(engine("sst", batch), torch.randint(0, 5, (8,)))
        engine.backward(loss)
        engine.step()
        d = out / f"zero{stage}"
        held = {"sst|quora": {"weights": [0.8, 0.2], "step": 5}}   # the loop's PeriodicFusion state
        engine.save_checkpoint(str(d / "deepspeed"), tag=eng.DS_TAG,
                               client_state={"step": 7, "periodic_fusion": held, "weighting": dwa.client_state()})
        again = eng.initialize(MultiTaskModel.from_config(cfg.model, ["sst"]), cfg)
        client = eng.load_checkpoint(again, d, 12)
        assert client["step"] == 7 and client["periodic_fusion"] == held
        resumed = make_weighting("dwa", ["sst", "quora"], {}, dwa_window=1)
        resumed.load_client_state(client["weighting"])             # DWA's loss history survives the resume
        assert resumed.weights() == dwa.weights() and resumed.weights()["sst"] != 1.0
        params = [engine.module.heads["sst"].out.weight, again.module.heads["sst"].out.weight]
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):   # ZeRO-3 partitions every weight
            assert params[0].numel() > 0 and torch.equal(params[0], params[1])
        print(f"zero{stage} reloaded")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    bad = out / "zero0" / "deepspeed" / eng.DS_TAG / "mp_rank_00_model_states.pt"
    bad.write_bytes(pickle.dumps({"module": Evil()}))
    engine = eng.initialize(MultiTaskModel.from_config(smoke().model, ["sst"]), smoke())
    try:
        eng.load_checkpoint(engine, out / "zero0", 12)
    except pickle.UnpicklingError as e:
        print("refused:", str(e).splitlines()[0][:80])
""")


def test_deepspeed_checkpoints_reload_weights_only_and_refuse_pickled_code(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in (0, 1, 2, 3):
        assert f"zero{stage} reloaded" in proc.stdout
    assert "refused:" in proc.stdout and "pwned" not in proc.stdout
