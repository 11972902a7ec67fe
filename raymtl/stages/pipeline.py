"""Teachers and the whole staged recipe as one job.

    pretrain -> teacher-<task> (one per distilled task) -> mtl (the distilled student)
    [-> mtl-plain: the same student without distillation, with --baseline]
    [student_from_teacher=T: the students start from teacher-T's checkpoint (intermediate-task
     training, STILTs) instead of the pre-trained encoder]

Every stage is an ordinary run of the shared loop (``jobs/pretrain.py``, ``jobs/teacher.py``,
``jobs/mtl.py`` run each alone); its checkpoint feeds the next stage's config. Pre-training
and the teachers train on the summed loss; the student uses the student config's ``fusion``
(default IMTL-G every 10 steps). A stage writes
``OUTPUT/<stage>/stage.json`` with a key hashed from its config, its upstream stages' keys and
the size/mtime of its data files, and its result; its runs go to ``OUTPUT/<stage>/<key>/``.
A later run skips a stage whose key matches (``--force`` redoes it), so an interrupted or
failed pipeline re-run picks up where it stopped: finished stages are skipped, the failed one
resumes from its own last checkpoint (Ray Train, same run directory), a stage whose config
changed trains afresh in a new directory, and nothing already produced is deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from raymtl import recipes
from raymtl.config import DistillConfig, MTLConfig
from raymtl.data.related import DEFAULT_RELATED, RELATED
from raymtl.recipes import PLAIN_ENCODER, SUM_LOSS
from raymtl.stages.distill import write_teacher_outputs
from raymtl.stages.pretrain import PretrainJobConfig, pretrain_smoke
from raymtl.tasks import TASKS
from raymtl.train.trainer import fit, fit_once, storage_path

TEACHER_MARGIN = 0.05       # PipelinePlan.teacher_margin


class StageFailed(RuntimeError):
    """A pipeline stage raised; the message names the stage."""


# ------------------------------------------------------------------------------ teachers
def teacher_config(base: MTLConfig, task: str, related: tuple[str, ...] | None = None, **overrides) -> MTLConfig:
    """A teacher for ``task``: the base config on that one task plus its related sets. A
    teacher distils from nothing, so the student's distillation settings are reset: they must
    not change the teacher's stage key (a new ``--distill-schedule`` retrains only the student)."""
    related = DEFAULT_RELATED.get(task, ()) if related is None else related
    return base.replace(tasks=(task,), related_sets=tuple(related), name=f"teacher-{task}",
                        task_weights={}, **asdict(DistillConfig()), **overrides)


def stage_result(run, what: str, **extra) -> dict:
    """A stage's JSON-able result: best checkpoint, its numeric metrics, and ``extra``. ``run``:
    ``fit``'s summary, or ``fit_once``'s metrics (which name the best checkpoint)."""
    checkpoint, metrics = ((run.get("best_checkpoint"), run) if isinstance(run, dict)
                           else (run.best_checkpoint, run.best_metrics))
    if not checkpoint:
        raise RuntimeError(f"{what} produced no checkpoint")
    return {"checkpoint": checkpoint, **extra,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def run_teacher(cfg: MTLConfig, verbose: bool = True, once: bool = False) -> dict:
    """Train a teacher (``cfg.data.tasks`` is its one task), then write its outputs on every
    training row of the task (from its prepared shards) to ``<run dir>/outputs``. Returns
    checkpoint, outputs, metrics. ``once``: a teacher run that finished before with the same
    config is read back (``fit_once``), and its outputs, once written, are kept (benchmarks)."""
    (task,) = cfg.data.tasks
    result = stage_result((fit_once if once else fit)(cfg, verbose=verbose), f"teacher {task}")
    out = Path(storage_path(cfg.run.output)) / cfg.run.name / "outputs"
    if once and (out / "meta.json").is_file():
        return {**result, "outputs": str(out)}
    t0 = time.perf_counter()
    meta = write_teacher_outputs(result["checkpoint"], task, cfg.data, str(out), cfg.data.max_length,
                                 cfg.scale.use_gpu, cpus=cfg.scale.cpus_per_worker)
    if verbose:
        print(f"[raymtl] teacher outputs: {meta['rows']} rows of {meta['data_file']} in "
              f"{time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    return {**result, "outputs": str(out)}


# ------------------------------------------------------------------------------ steps
@dataclass
class Step:
    name: str
    inputs: dict                                   # what the output depends on (hashed)
    run: Callable[[str], dict]                     # trains into the given run dir; returns a JSON-able result
    after: list[str] = field(default_factory=list)


def data_fingerprint(data_dir: str, rel_paths) -> dict[str, list]:
    """size and mtime of each data file (local paths; URIs are keyed by name only)."""
    out = {}
    for rel in sorted(set(rel_paths)):
        p = Path(data_dir) / rel
        out[rel] = [p.stat().st_size, int(p.stat().st_mtime)] if "://" not in data_dir and p.is_file() else []
    return out


def key_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_stages(stages: list[Step], output: str, force: set[str] | bool = False, say=print,
               results: dict[str, dict] | None = None) -> dict[str, dict]:
    """Run stages in order, skipping one whose ``stage.json`` key matches. ``results`` (filled
    stage by stage, also with a skipped stage's recorded result) is what later stages read."""
    results = {} if results is None else results
    keys: dict[str, str] = {}
    trained: set[str] = set()
    for st in stages:
        key = key_of({**st.inputs, "upstream": {a: keys[a] for a in st.after}})
        keys[st.name] = key
        marker = Path(output) / st.name / "stage.json"
        redo = (force is True or (isinstance(force, set) and st.name in force)
                or any(a in trained for a in st.after))          # an upstream stage trained anew
        if marker.is_file() and not redo:
            done = json.loads(marker.read_text())
            if done.get("key") == key:
                say(f"[raymtl] pipeline: stage {st.name} already done for these inputs and config "
                    f"(key {key}): skipped; --force {st.name} redoes it")
                results[st.name] = done["result"]
                continue
        run_dir = str(Path(output) / st.name / key)      # a new key never resumes another key's run
        if redo and Path(run_dir).exists():               # --force: train afresh, keep the old run
            Path(run_dir).rename(f"{run_dir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        say(f"[raymtl] pipeline: stage {st.name} (key {key}) starting in {run_dir}")
        t0 = time.perf_counter()
        try:
            result = st.run(run_dir)
        except Exception as e:                                  # noqa: BLE001 - re-raised with the stage
            raise StageFailed(f"stage {st.name!r} failed: {type(e).__name__}: {e}. Finished stages "
                              f"{list(results)} are kept under {output}; re-run to resume") from e
        marker.parent.mkdir(parents=True, exist_ok=True)
        record = {"stage": st.name, "key": key, "inputs": st.inputs, "seconds": round(time.perf_counter() - t0, 1),
                  "finished": datetime.now(timezone.utc).isoformat(), "result": result}
        marker.write_text(json.dumps(record, indent=2, default=str) + "\n")
        say(f"[raymtl] pipeline: stage {st.name} done in {record['seconds'] / 60:.1f} min")
        results[st.name] = result
        trained.add(st.name)
    return results


@dataclass
class PipelinePlan:
    student: MTLConfig                 # the multi-task stage (its encoder/data/scale are shared)
    output: str = "runs/pipeline"
    # 0: no pre-training stage (the default: no pre-training choice measured raises the student,
    # docs/results/pretrain-s*.md); N: recipes.pretrain() for N steps
    pretrain_steps: int = 0
    # a JSON config file of the pre-training stage (jobs/pretrain.py's --config format: its
    # objectives, weights, learning rates...) over recipes.pretrain(); runs the stage for its
    # own steps unless pretrain_steps says otherwise. Encoder, data, scale: the student's.
    pretrain_config: str = ""
    teacher_steps: int = 300
    # The teachers trained (docs/pipeline.md: the SST teacher, +SST-2 and CFIMDB, beat the
    # student on SST; the Quora +MRPC and STS +SICK teachers did not).
    teacher_tasks: tuple[str, ...] = ("sst",)
    baseline: bool = False             # also train the student without distillation
    smoke: bool = False
    # The recipe's teacher-margin rule: distil a teacher only if it beats the student trained
    # without distillation (the baseline, then always trained) on its task by this much,
    # relative (0.05: 5 %); 0 distils every teacher.
    teacher_margin: float = TEACHER_MARGIN
    # "cross": pair-task teachers read both sentences with cross attention, distilled into the
    # bi-encoder student (raymtl.stages.distill.TEACHER_TO_STUDENT); "": the student's pair modes
    teacher_pair_mode: str = ""
    # a task of teacher_tasks: the students start from that teacher's best checkpoint (its
    # encoder and head; intermediate-task training, STILTs) instead of the pre-trained encoder;
    # "": from the encoder (or the pre-training stage)
    student_from_teacher: str = ""

    def __post_init__(self):
        if self.pretrain_steps < 0 or self.teacher_steps <= 0:
            raise ValueError(f"pretrain_steps={self.pretrain_steps} must be >= 0 and "
                             f"teacher_steps={self.teacher_steps} > 0")
        if self.teacher_pair_mode not in ("", "cross", "bi"):
            raise ValueError(f"teacher_pair_mode={self.teacher_pair_mode!r}: choose 'cross', 'bi' or '' (the student's)")
        if not self.teacher_margin >= 0:
            raise ValueError(f"teacher_margin={self.teacher_margin!r} must be >= 0 (0 distils every teacher)")
        for t in self.teacher_tasks:
            if t not in self.student.data.tasks:
                raise ValueError(f"teacher_tasks: {t!r} is not one of the student's tasks {list(self.student.data.tasks)}")
        if self.student_from_teacher and self.student_from_teacher not in self.teacher_tasks:
            raise ValueError(f"student_from_teacher={self.student_from_teacher!r}: not one of teacher_tasks "
                             f"{list(self.teacher_tasks)}")
        t = self.student_from_teacher
        if t and self.teacher_pair_mode and TASKS[t].is_pair and self.teacher_pair_mode != self.student.model.mode_of(t):
            raise ValueError(f"student_from_teacher={t!r}: its teacher's pair mode {self.teacher_pair_mode!r} gives "
                             f"it another head than the student's ({self.student.model.mode_of(t)!r}); drop "
                             "--teacher-pair-mode to start the student from it")
        self.pretrain_base()                         # a bad file fails here, before any stage trains

    def pretrain_base(self) -> PretrainJobConfig | None:
        """The pre-training stage's config before the student's shared settings, or None (no stage)."""
        if not (self.pretrain_steps or self.pretrain_config):
            return None
        base = recipes.pretrain()
        if self.pretrain_config:
            base = PretrainJobConfig.load(self.pretrain_config, over=base)
        return pretrain_smoke(base) if self.smoke else base

    def stages(self, done: dict[str, dict], verbose: bool = True) -> list[Step]:
        """The stages; ``done`` is the results dict ``run_stages`` fills as they finish."""
        out, s = str(Path(self.output).expanduser().resolve()), self.student
        data_dir = s.data.data_dir
        stages: list[Step] = []
        task_files = [TASKS[t].path for t in s.data.tasks]

        pre_cfg, base = None, self.pretrain_base()
        if base is not None:
            steps = self.pretrain_steps or base.train.steps
            pre_cfg = base.replace(
                steps=steps, eval_every=steps, output=f"{out}/pretrain",
                name="pretrain", encoder=s.model.encoder, data_dir=data_dir, num_workers=s.scale.num_workers,
                use_gpu=s.scale.use_gpu, cpus_per_worker=s.scale.cpus_per_worker, zero_stage=s.scale.zero_stage,
                precision=s.scale.precision, max_rows=s.data.max_rows, split_seed=s.data.split_seed,
                val_fraction=s.data.val_fraction)

            def run_pretrain(run_dir, cfg=pre_cfg):
                return stage_result(fit(cfg.replace(output=run_dir), verbose=verbose), "pretrain")
            stages.append(Step("pretrain", {"config": pre_cfg.to_dict(), "data": data_fingerprint(
                data_dir, [*pre_cfg.pretrain.wiki_files, *pre_cfg.pretrain.nli_files, "sts/train.csv"])},
                run_pretrain))

        def init_from() -> str:
            return done["pretrain"]["checkpoint"] if pre_cfg else s.model.init_from

        def student_init() -> str:
            return done[f"teacher-{self.student_from_teacher}"]["checkpoint"] if self.student_from_teacher else init_from()

        for task in self.teacher_tasks:
            modes = ({"pair_mode": {**s.model.pair_mode, task: self.teacher_pair_mode}}
                     if self.teacher_pair_mode and TASKS[task].is_pair else {})
            # the teacher recipe's sampling, not the student's: temperature sampling would give the
            # task's large related stream most steps (SST 26 % of them beside SST-2), round robin
            # trains both every step, as jobs/teacher.py does
            t_cfg = teacher_config(s, task, steps=self.teacher_steps, output=f"{out}/teacher-{task}", **modes,
                                   init_from="" if pre_cfg else s.model.init_from, **SUM_LOSS, **PLAIN_ENCODER,
                                   sampling=recipes.teacher().train.sampling)
            files = task_files + [p for n in t_cfg.data.related_sets for p in RELATED[n].paths]

            def run_t(run_dir, cfg=t_cfg, task=task):
                cfg = cfg.replace(output=run_dir, init_from=init_from() if pre_cfg else cfg.model.init_from)
                return run_teacher(cfg, verbose)
            stages.append(Step(f"teacher-{task}", {"config": t_cfg.to_dict(), "data": data_fingerprint(data_dir, files)},
                                run_t, after=["pretrain"] if pre_cfg else []))

        def student_cfg(distilled: bool, name: str, run_dir: str, teachers=self.teacher_tasks) -> MTLConfig:
            cfg = s.replace(output=run_dir, name=name, init_from=student_init())
            if distilled:
                cfg = cfg.replace(teacher_outputs={t: done[f"teacher-{t}"]["outputs"] for t in teachers})
            return cfg

        def run_student(distilled: bool, name: str, run_dir: str) -> dict:
            if not distilled:
                return stage_result(fit(student_cfg(False, name, run_dir), verbose=verbose), name)
            kept = self.teachers_to_distil(done, say=print if verbose else (lambda m: None))
            if not kept:
                return {**done["mtl-plain"], "teachers": []}     # nothing to distil: the student is the baseline
            return stage_result(fit(student_cfg(True, name, run_dir, kept), verbose=verbose), name, teachers=kept)
        compare = bool(self.teacher_tasks) and self.teacher_margin > 0
        upstream = ((["pretrain"] if pre_cfg else []) + [f"teacher-{t}" for t in self.teacher_tasks]
                    + (["mtl-plain"] if compare else []))
        student_inputs = {"config": s.to_dict(), "data": data_fingerprint(data_dir, task_files),
                          **({"student_from_teacher": self.student_from_teacher} if self.student_from_teacher else {})}
        plain_after = ((["pretrain"] if pre_cfg else [])
                       + ([f"teacher-{self.student_from_teacher}"] if self.student_from_teacher else []))
        if self.baseline or compare:
            stages.append(Step("mtl-plain", {**student_inputs, "distilled": False},
                               lambda d: run_student(False, "mtl-plain", d), after=plain_after))
        stages.append(Step("mtl", {**student_inputs, "teacher_margin": self.teacher_margin},
                           lambda d: run_student(True, "mtl", d), after=upstream))
        return stages

    def teachers_to_distil(self, done: dict[str, dict], say=print) -> list[str]:
        """The teacher-margin rule: the teachers whose validation score on their task beats the
        baseline student's by ``teacher_margin`` (relative); prints the comparison."""
        if self.teacher_margin == 0:
            say("[raymtl] teacher margin 0: distilling every teacher (" + ", ".join(self.teacher_tasks) + ")")
            return list(self.teacher_tasks)
        say(f"[raymtl] teacher margin: a teacher is distilled if it beats the student without distillation "
            f"by {self.teacher_margin:.0%} (relative) on its task")
        say(f"{'task':<8}{'teacher':>10}{'student':>10}{'needed':>10}  decision")
        kept = []
        for t in self.teacher_tasks:
            teacher = done[f"teacher-{t}"]["metrics"][f"val_{t}"]
            student = done["mtl-plain"]["metrics"][f"val_{t}"]
            needed = student + self.teacher_margin * abs(student)      # relative, also for a negative Pearson
            ok = teacher >= needed
            kept += [t] if ok else []
            say(f"{t:<8}{teacher:>10.4f}{student:>10.4f}{needed:>10.4f}  "
                + ("distilled" if ok else "skipped: short of the margin"))
        if not kept:
            say("[raymtl] no teacher passed the margin: the student is the one trained without distillation "
                "(mtl-plain); --teacher-margin 0 distils anyway")
        return kept

    def run(self, force: set[str] | bool = False, verbose: bool = True) -> dict[str, dict]:
        os.makedirs(self.output, exist_ok=True)
        results: dict[str, dict] = {}
        stages = self.stages(results, verbose)
        names = {st.name for st in stages}
        if isinstance(force, set) and force - names:
            raise ValueError(f"--force names unknown stage(s) {sorted(force - names)}; stages: {[s.name for s in stages]}")
        run_stages(stages, self.output, force, results=results)
        (Path(self.output) / "pipeline.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        return results


def results_table(results: dict[str, dict]) -> str:
    """Validation scores of every stage that has them, side by side."""
    cols = ["val_sst", "val_quora", "val_sts", "overall"]
    lines = [f"{'stage':<16}" + "".join(f"{c.removeprefix('val_'):>10}" for c in cols)]
    for name, r in results.items():
        m = r.get("metrics", {})
        if name == "pretrain":
            lines.append(f"{name:<16}  zero-shot STS {m.get('sts_zero_shot_step0', float('nan')):.4f} -> "
                         f"{m.get('sts_zero_shot', float('nan')):.4f}")
            continue
        cells = [f"{m[c]:>10.4f}" if c in m and not (name.startswith("teacher") and c == "overall") else f"{'-':>10}"
                 for c in cols]
        lines.append(f"{name:<16}" + "".join(cells))
    return "\n".join(lines)
