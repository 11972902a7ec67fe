"""Validation scores of gradient-fusion methods on the default setup, one full run each.

    .venv/bin/python bench/fusion_quality.py --output runs/fusion               # ~14 min per method here
    .venv/bin/python bench/fusion_quality.py --methods sum,pcgrad --smoke       # tiny model, ~2 min

Every run is `jobs/mtl.py` on the embedded defaults with only `--fusion` changed (same
data, split, seed, steps, batch), through the same Ray Train + DeepSpeed loop. A method
whose run already finished under --output is read back, not retrained, so the script can
be run method by method. Prints the best checkpoint's validation scores per method.
"""
import argparse
import json
from pathlib import Path

from raymtl.config import MTLConfig, smoke
from raymtl.evaluation import format_table  # noqa: F401  (same score names as `raymtl evaluate`)
from raymtl.trainer import fit


def run_method(base: MTLConfig, method: str) -> dict:
    out = Path(base.run.output) / f"fusion-{method}" / "best_metrics.json"
    if out.is_file():
        return json.loads(out.read_text())
    summary = fit(base.replace(fusion=method, name=f"fusion-{method}"), verbose=False)
    metrics = {**summary.best_metrics, "best_checkpoint": summary.best_checkpoint}
    out.write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="sum,pcgrad,gradvac,cagrad")
    p.add_argument("--output", default="runs/fusion")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    base = (smoke() if a.smoke else MTLConfig()).replace(output=str(Path(a.output).resolve()))
    rows = {m: run_method(base, m) for m in a.methods.split(",")}
    print(f"\n{'fusion':<9} {'SST acc':>8} {'Quora acc':>10} {'STS r':>7} {'overall':>8} "
          f"{'best step':>9} {'s/step':>7}")
    for m, r in rows.items():
        print(f"{m:<9} {r['val_sst']:>8.4f} {r['val_quora']:>10.4f} {r['val_sts']:>7.4f} "
              f"{r['overall']:>8.4f} {r['step']:>9} {r.get('s_per_step', float('nan')):>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
