"""Search spaces match the config; a real 2-trial search runs, is analysed, and its best config trains."""
import json
from pathlib import Path

import pytest

from raymtl.config import MTLConfig, smoke
from raymtl.tune import load_space, validate_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.json"))

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_search_space_keys_are_config_fields_with_valid_values(path):
    space = load_space(path)
    assert space
    validate_space(space, MTLConfig())


def test_bad_search_space_is_rejected(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"learning_rate": {"uniform": [0, 1]}}))
    with pytest.raises(ValueError, match="'learning_rate' is not a config field"):
        load_space(tmp_path / "s.json")
    (tmp_path / "s.json").write_text(json.dumps({"fusion": {"choice": ["sum", "magic"]}}))
    with pytest.raises(ValueError, match="fusion='magic' is not valid"):
        validate_space(load_space(tmp_path / "s.json"), MTLConfig())


def test_smoke_search_is_analysed_and_its_best_config_trains(ray_cluster, data_dir, tmp_path):
    from raymtl.analysis.reports import analyze
    from raymtl.train.trainer import fit
    from raymtl.tune import build_tuner
    base = smoke().replace(data_dir=data_dir, steps=6, eval_every=2, max_rows=120, cpus_per_worker=1.0)
    space = {"lr": {"loguniform": [1e-4, 3e-3]}, "fusion": {"choice": ["sum", "pcgrad"]}}
    tuner, _ = build_tuner(base, space, num_samples=2, searcher="optuna", asha=True,
                           experiment="exp", storage=str(tmp_path))
    (tmp_path / "exp").mkdir(parents=True, exist_ok=True)
    base.save(tmp_path / "exp" / "raymtl_base.json")
    grid = tuner.fit()
    assert len(grid) == 2 and not grid.errors
    res = analyze(tmp_path / "exp")
    table = res["table"]
    assert len(table) == 2 and {"lr", "fusion", "best_overall", "status", "time_s"} <= set(table.columns)
    assert all(p.is_file() and p.stat().st_size > 1000 for p in res["plots"])
    best = MTLConfig.load(res["best_config"])
    assert best.train.fusion in ("sum", "pcgrad") and best.model.encoder == "tiny-random"
    summary = fit(best.replace(output=str(tmp_path / "best")), verbose=False)
    assert summary.best_checkpoint


def test_trial_workers_fit_beside_the_trial_driver():
    """2 CPUs, a 0.25-CPU trial driver: a 2-CPU worker would never start (the trial hung in
    'worker group startup timed out'); it is shrunk to 1.75 CPUs, which still runs 2 threads."""
    from raymtl.config import MTLConfig
    from raymtl.tune import fit_workers_beside_trial
    said = []
    cfg = fit_workers_beside_trial(MTLConfig(), cluster_cpus=2, trial_cpus=0.25, say=said.append)
    assert cfg.scale.cpus_per_worker == 1.75 and "cpus_per_worker=1.75" in said[0]
    roomy = MTLConfig().replace(cpus_per_worker=1.0)
    assert fit_workers_beside_trial(roomy, 2, 0.25, say=said.append) is roomy
    with pytest.raises(ValueError, match="num_workers=4 cannot fit"):
        fit_workers_beside_trial(MTLConfig().replace(num_workers=4), 0.25, 0.25)
