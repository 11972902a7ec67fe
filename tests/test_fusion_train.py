"""Fusion inside the real training loop and under real data parallelism (Ray Train, gloo)."""
import pytest
import torch

from raymtl.methods.fusion import FUSION_METHODS

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
    expected = FUSION_METHODS[method](torch.tensor(local).mean(0))
    # not the same as averaging each rank's locally fused gradient:
    local_then_mean = torch.stack([FUSION_METHODS[method](torch.tensor(g)) for g in local]).mean(0)
    assert not torch.allclose(expected, local_then_mean, atol=1e-3)
    fused, step_grad = result.return_value
    assert torch.allclose(torch.tensor(fused), expected, atol=1e-5)
    assert torch.allclose(torch.tensor(step_grad), expected, atol=1e-5)   # what the step hands DeepSpeed


# A real run per kind of method: plain sum, the stateful ones (GradVac's EMA, Nash-MTL's
# cvxpy solve) and CAGrad's solver; the other Gramian weightings (pcgrad, mgda, upgrad) share
# CAGrad's path, imtl_g runs below, and tests/test_fusion.py checks each one's weights.
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
                          fusion="imtl_g", fusion_every=2, cpus_per_worker=1.0, clip_scope="task")
    m = fit(cfg, verbose=False).metrics                  # fuses at steps 0 and 2, reuses at 1
    assert m["step"] == 3 and torch.isfinite(torch.tensor(m["train_loss"]))
    weights = [m[f"fusion_weight_{t}"] for t in ("sst", "quora", "sts")]
    assert all(w > 0 for w in weights) and sum(weights) == pytest.approx(1.0, abs=1e-4)   # IMTL-G's
    norms = {k: v for k, v in m.items() if k.startswith("grad_norm_")}      # clipped group by group
    assert set(norms) == {"grad_norm_shared", "grad_norm_sst", "grad_norm_quora", "grad_norm_sts"}
    assert all(v > 0 for v in norms.values())


def test_task_norm_state_follows_the_run_into_its_checkpoint_and_back(ray_cluster, data_dir, tmp_path):
    import json
    from pathlib import Path

    from raymtl.config import smoke
    from raymtl.models.multitask import MultiTaskModel
    from raymtl.train.trainer import fit

    def client_state(run_dir, step):
        """The loop's task_norm state in the run's checkpoint of ``step``."""
        checkpoint = next(d for d in Path(run_dir).glob("checkpoint_*")
                          if json.loads((d / "metrics.json").read_text())["step"] == step)
        state = torch.load(checkpoint / "deepspeed/state/mp_rank_00_model_states.pt", weights_only=False)
        return checkpoint, state["task_norm"]

    cfg = smoke().replace(data_dir=data_dir, output=str(tmp_path), steps=2, eval_every=2, max_rows=120,
                          fusion="sum", fusion_every=1, task_norm="adam", name="tn", cpus_per_worker=1.0)
    first = fit(cfg, verbose=False)
    checkpoint, state = client_state(first.run_dir, 2)
    assert state["counts"] == {"sst": 2, "quora": 2, "sts": 2}            # one update per step and task
    shared = [p for n, p in MultiTaskModel.load(checkpoint).named_parameters() if n.startswith("encoder.")]
    assert [v.shape for v in state["moments"]["sst"]] == [p.shape for p in shared]
    assert all(torch.isfinite(v).all() and (v >= 0).all() and v.sum() > 0 for v in state["moments"]["sts"])
    second = fit(cfg.replace(steps=3, eval_every=1), verbose=False)         # resumes at step 2
    assert second.metrics["start_step"] == 2
    assert client_state(second.run_dir, 3)[1]["counts"] == {"sst": 3, "quora": 3, "sts": 3}
