"""Ray Tune search over the multi-task stage: task weights, fusion method, sampling, learning rates.

    python jobs/tune.py --num-samples 8 --steps 120 --eval-every 30     # ~60 min on 2 CPU cores
    python jobs/tune.py --smoke --num-samples 2                          # tiny model, ~3 min
    python jobs/tune.py --resume --experiment mtl-search                 # continue an interrupted search
    python jobs/tune.py --space search_spaces/distill.json --experiment distill-search \
        --teacher-outputs sst=DIR     # T and alpha; DIR: "outputs" in runs/pipeline/teacher-sst/stage.json
    raymtl analyze runs/tune/mtl-search                                  # table, best config, plots

Each trial is a real Ray Train + DeepSpeed run of the multi-task loop; Optuna proposes,
ASHA stops weak trials on the validation `overall` score, trials run one at a time on a
2-CPU machine (no resource deadlock), a crashed trial is retried (--max-failures).
"""
import argparse
import json
import sys
from pathlib import Path

from raymtl.cli import add_config_args, config_from_args
from raymtl.train.trainer import ensure_ray, storage_path
from raymtl.tune import build_tuner, load_space, restore_tuner, validate_space


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--space", default=str(Path(__file__).resolve().parents[1] / "search_spaces" / "mtl.json"))
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--searcher", choices=["optuna", "random"], default="optuna")
    p.add_argument("--no-asha", action="store_true", help="run every trial to the end")
    p.add_argument("--experiment", default="mtl-search")
    p.add_argument("--max-trial-failures", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="continue the experiment (Tuner.restore)")
    a = p.parse_args(argv)
    if a.output is None:
        a.output = "runs/tune"
    try:
        base = config_from_args(a)
        space = load_space(a.space)
        validate_space(space, base)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    exp_dir = Path(storage_path(base.run.output)) / a.experiment
    ensure_ray()
    if a.resume:
        if not (exp_dir / "raymtl_base.json").is_file():
            p.error(f"nothing to resume: {exp_dir} has no raymtl_base.json")
        from raymtl.config import MTLConfig
        tuner = restore_tuner(str(exp_dir), MTLConfig.load(exp_dir / "raymtl_base.json"))
    else:
        tuner, _ = build_tuner(base, space, num_samples=a.num_samples, searcher=a.searcher,
                               asha=not a.no_asha, experiment=a.experiment, storage=base.run.output,
                               max_failures=a.max_trial_failures)
        exp_dir.mkdir(parents=True, exist_ok=True)
        base.save(exp_dir / "raymtl_base.json")
        (exp_dir / "raymtl_space.json").write_text(json.dumps(space, indent=2))
    grid = tuner.fit()
    best = grid.get_best_result(metric="overall", mode="max")
    print(f"[raymtl] best trial overall={best.metrics.get('overall')} params={best.config}")
    print(f"[raymtl] analyse with: raymtl analyze {exp_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
