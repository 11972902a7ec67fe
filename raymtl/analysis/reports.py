"""``raymtl analyze EXPERIMENT``: trial table, best config file, PNG plots.

Works on a finished, running or interrupted Tune experiment (it reads the experiment
state Tune writes as it goes).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from raymtl.config import MTLConfig
from raymtl.train.loop import HISTORY


def _flat_params(config: dict) -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def load_trials(exp_dir: str | Path) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], dict[str, dict]]:
    from ray.tune import ExperimentAnalysis
    ea = ExperimentAnalysis(str(exp_dir), default_metric="overall", default_mode="max")
    rows, curves, configs = [], {}, {}
    frames = ea.trial_dataframes
    for trial in ea.trials:
        df = frames.get(trial.trial_id, frames.get(trial.path, pd.DataFrame()))
        df = df if "overall" in df else pd.DataFrame(columns=["overall", "step"])
        curves[trial.trial_id], configs[trial.trial_id] = df, trial.config
        last = trial.last_result or {}
        rows.append({"trial": trial.trial_id, "status": trial.status, **_flat_params(trial.config),
                     "final_overall": df["overall"].iloc[-1] if len(df) else None,
                     "best_overall": df["overall"].max() if len(df) else None,
                     "reports": len(df), "step": last.get("step"),
                     "time_s": round(last.get("time_total_s", 0.0), 1)})
    table = pd.DataFrame(rows).sort_values("best_overall", ascending=False, na_position="last")
    return table.reset_index(drop=True), curves, configs


def plot(table: pd.DataFrame, curves: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    scored = table.dropna(subset=["best_overall"])

    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(table)), 3.5))
    ax.bar(scored["trial"].astype(str), scored["best_overall"], color="tab:blue")
    ax.set(ylabel="best validation overall", title="score per trial")
    ax.tick_params(axis="x", rotation=60)
    if len(scored):
        lo = scored["best_overall"].min()
        ax.set_ylim(max(0.0, lo - 0.05), min(1.0, scored["best_overall"].max() + 0.02))
    fig.tight_layout()
    paths.append(out / "score_per_trial.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for tid in scored["trial"].head(3):
        df = curves[tid]
        ax.plot(df["step"], df["overall"], marker="o", label=tid)
    ax.set(xlabel="step", ylabel="validation overall", title="learning curves, top 3 trials")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "learning_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    skip = {"trial", "status", "final_overall", "best_overall", "reports", "step", "time_s"}
    params = [c for c in table.columns if c not in skip and table[c].nunique(dropna=True) > 1]
    if params:
        from matplotlib.ticker import NullFormatter
        cols = min(4, len(params))
        rows = -(-len(params) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False)
        # a trial ASHA stopped early was scored at fewer steps than one that ran to the end
        full = scored["step"] == scored["step"].max()
        for ax, p in zip(axes.flat, params):
            x = scored[p]
            if not pd.api.types.is_numeric_dtype(x):
                cats = sorted(x.astype(str).unique())
                x = pd.Series([cats.index(v) for v in x.astype(str)], index=scored.index)
                ax.set_xticks(range(len(cats)), cats, rotation=45)
            elif p.endswith("lr"):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.scatter(x[full], scored["best_overall"][full], label="ran to the end")
            ax.scatter(x[~full], scored["best_overall"][~full], marker="x", label="stopped early (ASHA)")
            ax.set(xlabel=p, ylabel="overall")
        for ax in axes.flat[len(params):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle("score against each searched parameter")
        fig.tight_layout()
        paths.append(out / "score_vs_params.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def analyze(exp_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    exp = Path(exp_dir)
    if not exp.is_dir():
        raise FileNotFoundError(f"experiment directory {exp} does not exist")
    out = Path(out_dir) if out_dir else exp / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    table, curves, configs = load_trials(exp)
    table.to_csv(out / "trials.csv", index=False)
    result = {"table": table, "plots": plot(table, curves, out), "best_config": None}
    scored = table.dropna(subset=["best_overall"])
    if len(scored):
        best_id = scored["trial"].iloc[0]
        base_file = exp / "raymtl_base.json"
        base = MTLConfig.load(base_file) if base_file.is_file() else MTLConfig()
        best = base.replace(**configs[best_id], name=f"best-{best_id}")
        best.save(out / "best_config.json")
        result["best_config"] = out / "best_config.json"
        result["best_trial"] = best_id
    return result


def format_trials(table: pd.DataFrame) -> str:
    shown = table.copy()
    for c in shown.columns:
        if pd.api.types.is_float_dtype(shown[c]):
            shown[c] = shown[c].map(lambda v: f"{v:.4g}" if pd.notna(v) else "")
    return shown.to_markdown(index=False) if _has_tabulate() else shown.to_string(index=False)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------ raymtl curves RUN [RUN ...]
def load_curve(run: str | Path) -> pd.DataFrame:
    """One run's validation history (a row per report), from the newest checkpoint of a run
    directory, or from a checkpoint directory itself."""
    d = Path(run)
    if not d.is_dir():
        raise FileNotFoundError(f"run directory {d} does not exist")
    files = [d / HISTORY] if (d / HISTORY).is_file() else sorted(d.glob(f"checkpoint_*/{HISTORY}"))
    if not files:
        has_checkpoints = any(d.glob("checkpoint_*/metrics.json")) or (d / "metrics.json").is_file()
        raise FileNotFoundError(
            f"{d}: no {HISTORY} in it or in a checkpoint_* directory under it"
            + (" (its checkpoints predate the history; re-run to record one)" if has_checkpoints else
               " (not a raymtl run directory or checkpoint)"))
    histories = [json.loads(f.read_text()) for f in files]
    longest = max(histories, key=lambda h: (h[-1]["step"] if h else -1, len(h)))
    return pd.DataFrame(longest).sort_values("step").reset_index(drop=True)


def _label_and_path(spec: str) -> tuple[str, str]:
    if "=" in spec and not Path(spec).exists():
        label, path = spec.split("=", 1)
        return label, path
    p = Path(spec)
    return (p.parent.name if p.name.startswith("checkpoint_") else p.name), spec


def default_metrics(frames: dict[str, pd.DataFrame]) -> list[str]:
    """Validation scores present in any run: ``val_*`` and ``overall`` (MTL runs) or the
    pre-training stage's ``mlm_loss`` and ``sts_zero_shot``."""
    seen = []
    for df in frames.values():
        seen += [c for c in df.columns if (c.startswith("val_") or c in ("overall", "mlm_loss", "sts_zero_shot"))
                 and not c.endswith("_step0") and c not in seen]
    return seen


def curves(runs: list[str], out_dir: str | Path, metrics: list[str] | None = None) -> dict:
    """Learning curves of several runs on one figure: a panel per metric, a line per run.
    Writes ``curves.png`` and ``curves.csv`` (run, step, metric, value) to ``out_dir``."""
    if not runs:
        raise ValueError("curves: name at least one run directory")
    frames = {}
    for spec in runs:
        label, path = _label_and_path(spec)
        if label in frames:
            raise ValueError(f"curves: two runs are labelled {label!r}; name them as LABEL=PATH")
        frames[label] = load_curve(path)
    metrics = list(metrics) if metrics else default_metrics(frames)
    missing = [m for m in metrics if not any(m in df for df in frames.values())]
    if missing or not metrics:
        known = sorted({c for df in frames.values() for c in df.columns})
        raise ValueError(f"curves: metric(s) {missing or metrics} in none of the runs; they report {known}")
    long = pd.concat([df[["step", m]].dropna().rename(columns={m: "value"}).assign(run=label, metric=m)
                      for label, df in frames.items() for m in metrics if m in df], ignore_index=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    long[["run", "step", "metric", "value"]].to_csv(out / "curves.csv", index=False)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for label in frames:
            part = long[(long.run == label) & (long.metric == m)]
            ax.plot(part["step"], part["value"], marker="o", markersize=3, label=label)
        ax.set(title=m, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    table = long.pivot_table(index=["run", "step"], columns="metric", values="value", sort=False).reset_index()
    table.columns.name = None
    return {"table": table[["run", "step", *metrics]], "plot": out / "curves.png", "csv": out / "curves.csv"}
