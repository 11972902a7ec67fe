"""Fusion inside the real training loop and under real data parallelism (Ray Train, gloo)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raymtl.methods.fusion import FUSION_METHODS, make_fusion

pytestmark = pytest.mark.timeout(900)


def fuse_on_worker(config):
    """Each rank holds different per-task gradients; returns what the rank fuses."""
    import ray.train

    from raymtl.methods.fusion import fused_surrogate, global_task_gradients, make_fusion
    rank = ray.train.get_context().get_world_rank()
    G = torch.tensor(config["local"][rank])
    shared = torch.nn.Parameter(torch.zeros(2))             # the training step's path: losses whose
    losses = {"a": shared @ G[0], "b": shared @ G[1]}       # gradients are this rank's rows
    fused_surrogate(losses, [shared], [], make_fusion(config["method"], 2)).backward()
    return make_fusion(config["method"], 2)(global_task_gradients(G.clone())).tolist(), shared.grad.tolist()


@pytest.mark.parametrize("method", ["pcgrad", "mgda"])
def test_two_workers_fuse_the_globally_averaged_task_gradients(ray_cluster, tmp_path, method):
    import sys

    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    local = [[[1.0, 0.0], [-1.0, 0.2]], [[1.0, 0.4], [0.0, 1.0]]]     # rank -> [T=2, D=2]
    result = TorchTrainer(
        fuse_on_worker, train_loop_config={"local": local, "method": method},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path), name="dp")).fit()
    expected = make_fusion(method, 2)(torch.tensor(local).mean(0))
    # not the same as averaging each rank's locally fused gradient:
    local_then_mean = torch.stack([make_fusion(method, 2)(torch.tensor(g)) for g in local]).mean(0)
    assert not torch.allclose(expected, local_then_mean, atol=1e-3)
    fused, step_grad = result.return_value
    assert torch.allclose(torch.tensor(fused), expected, atol=1e-5)
    assert torch.allclose(torch.tensor(step_grad), expected, atol=1e-5)   # what the step hands DeepSpeed


@pytest.fixture(scope="module")
def real_steps() -> dict[tuple, dict]:
    """``tests/fused_step.py``: the loop's step per method on the smoke model, in a subprocess
    without Ray, keyed by (method, ZeRO stage, fusion_every, step)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("fused_step.py")), "--port", "29575"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {(r["method"], r["zero_stage"], r["fusion_every"], r["step"]): r for r in rows}


@pytest.mark.parametrize("method", sorted(FUSION_METHODS))
def test_the_real_step_hands_the_optimizer_the_method_s_fused_gradient(real_steps, method):
    """The gradient DeepSpeed steps on is the method applied to the [T, D] matrix of task
    gradients, to 1e-5 of its largest entry: fused every step (ZeRO 0 and 2), and with
    fusion_every 10 on the refresh step and on the step after, with the held weights."""
    assert max(real_steps[(method, 0, 1, 0)]["cos"]) < 0     # every pair of tasks conflicts
    for stage, every, step in [(0, 1, 0), (2, 1, 0), (0, 10, 0), (0, 10, 1)]:
        r = real_steps[(method, stage, every, step)]
        assert method == "sum" or r["vs_sum"] > 1e-2, r     # not passing as the plain sum
        assert r["grad"] < 1e-5, r                          # held by DeepSpeed before its step
        assert r["others"] < 1e-5, r                        # heads, PALs, own layers: plain gradient
        assert r["moment"] is None or r["moment"] < 1e-5, r  # AdamW's first moment after it


# A real run per kind of method: plain sum, the stateful ones (GradVac's EMA, Nash-MTL's
# cvxpy solve) and CAGrad's solver; the other Gramian weightings (pcgrad, mgda, upgrad) share
# CAGrad's path, imtl_g runs below, tests/test_fusion.py checks each one's weights and the
# test above the gradient each one's step hands DeepSpeed.
@pytest.mark.parametrize("method", ["sum", "gradvac", "cagrad", "nash_mtl"])
def test_one_real_training_step_per_kind_of_method(ray_cluster, data_dir, tmp_path, method):
    from raymtl.config import smoke
    from raymtl.train.trainer import fit
    cfg = smoke().replace(data_dir=data_dir, output=str(tmp_path), steps=2, eval_every=2, max_rows=120,
                          fusion=method, diagnostics=True, cpus_per_worker=1.0)
    summary = fit(cfg, verbose=False)
    m = summary.metrics
    assert m["step"] == 2 and torch.isfinite(torch.tensor(m["train_loss"]))
    assert {"gradcos_sst_quora", "gradcos_sst_sts", "gradcos_quora_sts", "fused_norm"} <= set(m)
    assert -1.0 <= m["gradcos_sst_quora"] <= 1.0 and m["fused_norm"] > 0


def test_periodic_fusion_trains_and_reports_the_task_weights(ray_cluster, data_dir, tmp_path):
    from raymtl.config import smoke
    from raymtl.train.trainer import fit
    cfg = smoke().replace(data_dir=data_dir, output=str(tmp_path), steps=3, eval_every=3, max_rows=120,
                          fusion="imtl_g", fusion_every=2, cpus_per_worker=1.0)
    m = fit(cfg, verbose=False).metrics                  # fuses at steps 0 and 2, reuses at 1
    assert m["step"] == 3 and torch.isfinite(torch.tensor(m["train_loss"]))
    weights = [m[f"fusion_weight_{t}"] for t in ("sst", "quora", "sts")]
    assert all(w > 0 for w in weights) and sum(weights) == pytest.approx(1.0, abs=1e-4)   # IMTL-G's
