"""Validation scores of gradient-fusion methods on the default setup, one full run each.

    .venv/bin/python bench/fusion_quality.py --output runs/fusion               # ~14 min per method here
    .venv/bin/python bench/fusion_quality.py --methods sum,pcgrad --smoke       # tiny model, ~2 min

Every run is `jobs/mtl.py` on the embedded defaults with only `--fusion METHOD --fusion-every 1`
changed (each method fused every step; same
data, split, seed, steps, batch), through the same Ray Train + DeepSpeed loop. A method
whose run already finished under --output is read back, not retrained, so the script can
be run method by method. Prints the best checkpoint's validation scores per method.
"""
import argparse
from pathlib import Path

from raymtl.config import MTLConfig, smoke
from raymtl.recipes import PLAIN_ENCODER
from raymtl.train.trainer import fit_once


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="sum,pcgrad,gradvac,cagrad")
    p.add_argument("--output", default="runs/fusion")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    base = (smoke() if a.smoke else MTLConfig()).replace(output=str(Path(a.output).resolve()), **PLAIN_ENCODER)
    rows = {m: fit_once(base.replace(fusion=m, fusion_every=1, name=f"fusion-{m}")) for m in a.methods.split(",")}
    print(f"\n{'fusion':<9} {'SST acc':>8} {'Quora acc':>10} {'STS r':>7} {'overall':>8} "
          f"{'best step':>9} {'s/step':>7}")
    for m, r in rows.items():
        print(f"{m:<9} {r['val_sst']:>8.4f} {r['val_quora']:>10.4f} {r['val_sts']:>7.4f} "
              f"{r['overall']:>8.4f} {r['step']:>9} {r.get('s_per_step', float('nan')):>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
