"""Transfer strategies (raymtl/transfer.py) and the task-relationship map (raymtl/relations.py)."""
import csv
import json
import math
from pathlib import Path

import pytest

from raymtl.config import MTLConfig, smoke
from raymtl.stages.transfer import CHOICES, choose, plan, resolve, run_strategy

pytestmark = pytest.mark.timeout(900)


# ------------------------------------------------------------------ the size heuristic
@pytest.mark.parametrize("target,support,sizes,expected", [
    ("sts", "quora", {"sts": 5436, "quora": 20044}, "pairwise"),     # the smaller target: pairwise MTL
    ("quora", "sts", {"sts": 5436, "quora": 20044}, "stilts"),       # the larger target: STILTs
    ("sst", "sts", {"sst": 7690, "sts": 5436}, "stilts"),
    ("sst", "quora", {"sst": 100, "quora": 100}, "stilts"),          # equal: not fewer, so stilts
    ("sst", "quora", {"sst": 99, "quora": 100}, "pairwise"),
])
def test_heuristic_on_given_sizes(target, support, sizes, expected):
    strategy, reason = choose(target, support, sizes)
    assert strategy == expected
    assert f"{sizes[target]:,}" in reason and f"{sizes[support]:,}" in reason and target in reason
    assert resolve("auto", target, support, sizes) == (strategy, reason)
    assert resolve("pairwise", target, support, sizes)[0] == "pairwise"     # explicit choices stay


@pytest.mark.parametrize("strategy,target,support,message", [
    ("ulmfit", "sts", "quora", r"strategy='ulmfit' is not valid; choose one of \['mtl_all', 'pairwise', 'stilts', 'auto'\]"),
    ("pairwise", "mnli", "quora", r"target='mnli' is not a task; choose one of \['sst', 'quora', 'sts'\]"),
    ("stilts", "sts", "snli", r"support='snli' is not a task"),
    ("stilts", "sts", "sts", r"support='sts' is the target itself"),
    ("pairwise", "sts", None, r"strategy='pairwise' needs a supporting task"),
    ("stilts", "sts", None, r"strategy='stilts' needs a supporting task"),
    ("auto", "sts", None, r"strategy='auto' needs a supporting task"),
])
def test_bad_inputs_are_refused(strategy, target, support, message):
    with pytest.raises(ValueError, match=message):
        resolve(strategy, target, support, {"sst": 1, "quora": 2, "sts": 3})
    with pytest.raises(ValueError, match=message):
        run_strategy(MTLConfig(), strategy, target, support, fit=lambda cfg, verbose: pytest.fail("trained"))


def test_heuristic_needs_both_sizes_and_mtl_all_needs_the_target():
    with pytest.raises(ValueError, match=r"no training size for \['quora'\]"):
        choose("sts", "quora", {"sts": 10})
    with pytest.raises(ValueError, match="do not include the target 'quora'"):
        plan("mtl_all", "quora", None, MTLConfig().replace(tasks=("sst", "sts")))
    with pytest.raises(ValueError, match="resolve 'auto'"):
        plan("auto", "sts", "quora", MTLConfig())
    assert set(CHOICES) == {"mtl_all", "pairwise", "stilts", "auto"}


def test_plans_narrow_the_config_and_share_runs():
    base = MTLConfig().replace(related_sets=("sst2", "sick"), teacher_outputs={"sst": "/t/sst"})
    (first, second) = plan("stilts", "sts", "sst", base)
    assert first.cfg.data.tasks == ("sst",) and first.after is None
    assert first.cfg.data.related_sets == ("sst2",) and first.cfg.distill.teacher_outputs == {"sst": "/t/sst"}
    assert second.cfg.data.tasks == ("sts",) and second.after == first.name
    assert second.cfg.data.related_sets == ("sick",) and second.cfg.distill.teacher_outputs == {}
    assert plan("stilts", "quora", "sst", base)[0].name == first.name          # one support run per support
    (ab,), (ba,) = plan("pairwise", "sts", "quora", base), plan("pairwise", "quora", "sts", base)
    assert ab.name == ba.name and ab.cfg == ba.cfg and ab.cfg.data.tasks == ("quora", "sts")
    (everything,) = plan("mtl_all", "sts", None, base)
    assert everything.cfg.data.tasks == base.data.tasks and everything.cfg.data.related_sets == ("sst2", "sick")


# ------------------------------------------------------------------ the chain, with a stand-in trainer
def stand_in_fit(calls: list):
    """A trainer that records each config and 'writes' one checkpoint into its run directory."""
    from raymtl.train.trainer import FitSummary

    def fit(cfg, verbose=True):
        calls.append(cfg)
        ckpt = Path(cfg.run.output) / cfg.run.name / "checkpoint_000000"
        ckpt.mkdir(parents=True)
        metrics = {f"val_{t}": 0.5 + 0.1 * len(calls) for t in cfg.data.tasks}
        return FitSummary(metrics=metrics, best_checkpoint=str(ckpt), best_metrics={**metrics, "overall": 0.5},
                          run_dir=str(ckpt.parent))
    return fit


def test_stilts_chain_feeds_the_first_checkpoint_and_reuses_finished_runs(tmp_path):
    calls: list[MTLConfig] = []
    base = smoke().replace(output=str(tmp_path))
    out = run_strategy(base, "stilts", "sts", "quora", fit=stand_in_fit(calls), say=lambda m: None)
    assert [c.data.tasks for c in calls] == [("quora",), ("sts",)]
    first = out.runs["stilts-quora"]["checkpoint"]
    assert calls[0].model.init_from == "" and calls[1].model.init_from == first
    assert out.strategy == "stilts" and out.score == pytest.approx(0.7)           # the second run's val_sts
    again = run_strategy(base, "auto", "sts", "quora", {"sts": 200, "quora": 100}, fit=stand_in_fit(calls),
                         say=lambda m: None)
    assert len(calls) == 2 and again.runs == out.runs and "200 >= 100" in again.reason   # read back
    run_strategy(base, "stilts", "sst", "quora", fit=stand_in_fit(calls), say=lambda m: None)
    assert [c.data.tasks for c in calls[2:]] == [("sst",)]                        # the support run is shared
    assert calls[2].model.init_from == first
    run_strategy(base.replace(lr=2e-3), "stilts", "sts", "quora", fit=stand_in_fit(calls), say=lambda m: None)
    assert [c.data.tasks for c in calls[3:]] == [("quora",), ("sts",)]           # a new config retrains both


# (the chain through Ray Train: tests/test_bench.py::test_transfer_smoke_table_next_to_the_heuristic,
# whose bench trains the same STILTs chain)


# ------------------------------------------------------------------ the relationship map (the shared loop)
def test_relations_on_the_tiny_model_give_a_full_matrix(ray_cluster, data_dir, tmp_path, capsys):
    from raymtl.analysis.relations import measure
    from raymtl.cli import main as raymtl_main
    from raymtl.stages.relations import relations_smoke
    assert raymtl_main(["relations", "--smoke", "--data-dir", data_dir, "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "inter-task affinity" in printed and "gradient cosine" in printed
    out = tmp_path / "relations"
    res = json.loads((out / "relations.json").read_text())
    tasks = res["tasks"]
    assert tasks == ["sst", "quora", "sts"]
    for key in ("affinity", "gradient_cosine"):
        assert sorted(res[key]) == sorted(tasks) and all(sorted(res[key][a]) == sorted(tasks) for a in tasks)
        assert all(math.isfinite(res[key][a][b]) for a in tasks for b in tasks)
    cos = res["gradient_cosine"]
    assert all(cos[a][a] == 1.0 and cos[a][b] == cos[b][a] and -1 <= cos[a][b] <= 1 for a in tasks for b in tasks)
    for a in tasks:                                           # affinity is what the losses say
        for b in tasks:
            want = 1 - res["val_loss_after"][a][b] / res["val_loss_before"][b]
            assert res["affinity"][a][b] == pytest.approx(want)
    with open(out / "relations.csv") as f:
        assert len(list(csv.DictReader(f))) == len(tasks) ** 2
    png = (out / "relations.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # the map comes from runs of the shared loop: a joint run, then one run per task from its checkpoint
    runs = out / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["joint", "lookahead-quora", "lookahead-sst", "lookahead-sts"]
    joint = json.loads((runs / "joint" / "best_metrics.json").read_text())
    assert joint["step"] == 4 and joint["lr"] == pytest.approx(relations_smoke().train.lr)   # constant: no decay
    ahead = json.loads((runs / "lookahead-sst" / "best_metrics.json").read_text())
    assert ahead["step"] == 6 and ahead["start_step"] == 4 and set(ahead) >= {"train_loss_sst"}
    assert not {"train_loss_quora", "train_loss_sts"} & set(ahead)     # only A trains in A's lookahead
    again = measure(relations_smoke().replace(data_dir=data_dir, output=str(tmp_path)), say=lambda m: None)
    assert again["affinity"] == res["affinity"]       # read back from the finished runs, not re-trained


def test_relations_config_is_checked():
    from raymtl.stages.relations import relations_smoke
    with pytest.raises(ValueError, match="at least two tasks"):
        relations_smoke().replace(tasks=("sst",))
    with pytest.raises(ValueError, match=r"probe_rows=4 must be >= batch_size=8"):
        relations_smoke().replace(probe_rows=4)
    with pytest.raises(ValueError, match=r"lookahead_steps=0 must be > 0"):
        relations_smoke().replace(lookahead_steps=0)
