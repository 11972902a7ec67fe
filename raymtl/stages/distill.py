"""Teacher outputs, computed once with Ray Data batch inference and read by distillation.

``write_teacher_outputs`` streams the training rows of its task from the prepared shards
(``raymtl.data.multitask.prepare_task``: the cache the teacher trained from, so nothing is
read or tokenized on the driver), runs the teacher checkpoint over them (``map_batches``
with an actor pool; a GPU per actor when asked) and writes Parquet files of ``line`` (the
row's line in the train file) and ``teacher`` (its logits, or its score) plus ``meta.json``
saying which checkpoint, head kind, data file and split produced them. The multi-task stage
(``distill`` config section) adds them to its streamed training rows by line (each Ray Data
worker process loads the outputs once; the driver reads only their ``line`` column, to check
them); it refuses outputs from another split (the teacher would have trained on the
student's validation rows) or that miss any of its rows. The loss is
``raymtl.objectives.multitask.task_loss``.
"""
from __future__ import annotations

import json
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from raymtl.data.multitask import batch_from_rows
from raymtl.data.prepare import per_process
from raymtl.data.readers import DataError
from raymtl.models.device import resolve_device, to_device
from raymtl.models.heads import head_kind
from raymtl.models.multitask import MultiTaskModel
from raymtl.tasks import TASKS

META = "meta.json"


class TeacherInference:
    """Ray Data ``map_batches`` callable: loads the teacher once per actor."""

    def __init__(self, checkpoint: str, task: str, max_length: int, use_gpu: bool = False, threads: int = 1,
                 chunk: int = 128):
        from transformers import AutoTokenizer

        torch.set_num_threads(threads)             # Ray sets OMP_NUM_THREADS=1 in actors
        self.device = resolve_device("cuda" if use_gpu else "cpu")
        self.model = MultiTaskModel.load(checkpoint).eval().to(self.device)
        self.tok = AutoTokenizer.from_pretrained(Path(checkpoint) / "encoder")
        self.task, self.max_length, self.chunk = task, max_length, chunk

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs in the batch's order; run in chunks of ``chunk`` rows of similar length
        (a chunk pads only to its own longest row)."""
        n = len(batch["line"])
        order = np.argsort([len(a) + len(b) for a, b in zip(batch["text_a"], batch["text_b"])], kind="stable")
        outputs: list = [None] * n
        for start in range(0, n, self.chunk):
            idx = order[start:start + self.chunk]
            rows = [{"text_a": batch["text_a"][i], "text_b": batch["text_b"][i], "label": 0.0,
                     "line": int(batch["line"][i])} for i in idx]
            enc = batch_from_rows(self.tok, rows, self.model.modes[self.task], self.max_length,
                                  self.model.text_prefix(self.task))
            with torch.no_grad():
                out = self.model(self.task, to_device(enc, self.model))
            for i, o in zip(idx, out.float().cpu().numpy().reshape(len(rows), -1)):     # (B, C) or (B, 1)
                outputs[i] = o
        return {"line": batch["line"].astype(np.int64), "teacher": outputs}


def split_settings(data_cfg) -> dict:
    """What decides which rows are training rows; teacher and student must agree."""
    return {"val_fraction": data_cfg.val_fraction, "split_seed": data_cfg.split_seed,
            "max_rows": data_cfg.max_rows}


def write_teacher_outputs(checkpoint: str, task: str, data_cfg, out_dir: str, max_length: int = 128,
                          use_gpu: bool = False, batch_size: int = 128, cpus: float = 2.0) -> dict:
    """Teacher outputs for every training row of ``task`` -> ``out_dir``; returns the meta.
    The rows stream from the task's prepared shards in blocks of 1,024, each run in length
    order in batches of ``batch_size``; the actor takes ``cpus`` CPUs (and threads), or one GPU."""
    import ray

    from raymtl.data.multitask import prepare_task

    spec = TASKS[task]
    modes = json.loads((Path(checkpoint) / "raymtl.json").read_text())["modes"]
    if task not in modes:
        raise DataError(f"teacher checkpoint {checkpoint} has no head for {task!r}; it has {sorted(modes)}")
    kind = head_kind(spec, modes[task])
    prep = prepare_task(data_cfg, task, str(Path(checkpoint) / "encoder"), modes[task])
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    cpus = 1 if use_gpu else cpus
    ds = prep.dataset("split=train", ["line", "text_a", "text_b"])
    with warnings.catch_warnings():
        # max_restarts goes through ray_remote_args, deprecated for Ray 2.64 with no named
        # parameter in 2.60 (pinned): keep the warning off the console
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            TeacherInference, fn_constructor_kwargs={"checkpoint": str(checkpoint), "task": task,
                                                     "max_length": max_length, "use_gpu": use_gpu,
                                                     "threads": max(1, int(cpus)), "chunk": batch_size},
            batch_size=1024, compute=ray.data.ActorPoolStrategy(size=1),
            # no actor restarts: a restartable actor whose constructor arguments sit in the
            # object store makes Ray's core worker print a warning on the console
            num_cpus=cpus, num_gpus=1 if use_gpu else 0, max_restarts=0)
    ds.write_parquet(str(out / "parquet"))
    meta = {"task": task, "checkpoint": str(checkpoint), "head_kind": kind, "rows": prep.counts["train"],
            "data_file": f"{data_cfg.data_dir.rstrip('/')}/{spec.path}", "shards": prep.path,
            "written": uuid.uuid4().hex, **split_settings(data_cfg)}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def check_teacher_outputs(out_dir: str, task: str, data_cfg, head_kind: str) -> tuple[str, str, str]:
    """Check a teacher-output directory fits this run -> (the teacher's head kind, the
    student's, the id of this writing of the outputs)."""
    d = Path(out_dir)
    if not (d / META).is_file():
        raise DataError(f"teacher outputs for {task!r}: {d / META} not found (write them with "
                        f"`python jobs/teacher.py --task {task}`)")
    meta = json.loads((d / META).read_text())
    if meta["task"] != task:
        raise DataError(f"{d / META}: outputs are for task {meta['task']!r}, not {task!r}")
    for k, v in split_settings(data_cfg).items():
        if meta.get(k) != v:
            raise DataError(f"{d / META}: teacher used {k}={meta.get(k)!r}, this run {k}={v!r}; the teacher "
                            "must be trained on the same train/validation split (else it saw validation rows)")
    if meta["head_kind"] != head_kind and (meta["head_kind"], head_kind) not in TEACHER_TO_STUDENT:
        raise DataError(f"{d / META}: the teacher's {task} head is {meta['head_kind']!r}, the student's "
                        f"{head_kind!r}, and there is no mapping between them (mapped: "
                        f"{', '.join(f'{a} -> {b}' for a, b in TEACHER_TO_STUDENT)}; same kinds compare directly)")
    return meta["head_kind"], head_kind, meta.get("written") or str((d / META).stat().st_mtime_ns)


def read_teacher_outputs(out_dir: str, task: str, kinds: tuple[str, ...]) -> dict[int, np.ndarray]:
    """``{line: output}`` in the student's units (``kinds``: teacher's and student's head kind)."""
    kinds = tuple(kinds[:2])
    table = pq.read_table(Path(out_dir) / "parquet")
    convert = TEACHER_TO_STUDENT.get(tuple(kinds)) if kinds[0] != kinds[1] else None
    outputs = [np.asarray(o, dtype=np.float32) for o in table.column("teacher").to_pylist()]
    if convert is not None:
        outputs = [convert(o, TASKS[task].label_range) for o in outputs]
    return {int(n): o for n, o in zip(table.column("line").to_numpy(), outputs)}


def load_teacher_outputs(out_dir: str, task: str, data_cfg, head_kind: str) -> dict[int, np.ndarray]:
    """``{line: output}`` of a teacher-output directory, after checking it fits this run."""
    return read_teacher_outputs(out_dir, task, check_teacher_outputs(out_dir, task, data_cfg, head_kind))


def _score_to_cosine(score: np.ndarray, label_range: tuple[float, float]) -> np.ndarray:
    """A cross-encoder's score in the label range -> the bi-encoder's cosine, by the inverse of
    the map the cosine head predicts with (``raymtl.models.heads.Head.predict``)."""
    lo, hi = label_range
    return np.clip(2 * (score - lo) / (hi - lo) - 1, -1.0, 1.0).astype(np.float32)


def _cosine_to_score(cos: np.ndarray, label_range: tuple[float, float]) -> np.ndarray:
    lo, hi = label_range
    return (lo + (hi - lo) * (np.clip(cos, -1, 1) + 1) / 2).astype(np.float32)


# (teacher head kind, student head kind) -> how a teacher output becomes the student's units.
# Pair-task teachers may score with cross attention while the student is a bi-encoder (Distilled
# Sentence Embedding; Trans-Encoder's cross -> bi): classifier logits compare as they are (KL with
# the temperature); a regression score maps onto the cosine head's scale (MSE).
TEACHER_TO_STUDENT = {("regression", "cosine"): _score_to_cosine, ("cosine", "regression"): _cosine_to_score}


class TeacherLookup:
    """One worker process's ``{line: output}`` of a teacher-output directory (``per_process``;
    ``kinds`` ends with the outputs' ``written`` id, so outputs written again are read again)."""

    def __init__(self, out_dir: str, task: str, kinds: list[str]):
        self.outputs = read_teacher_outputs(out_dir, task, tuple(kinds))


def with_teacher(batch: dict[str, np.ndarray], lookup: tuple[type, dict]) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: the batch plus its rows' ``teacher`` outputs."""
    outputs = per_process(lookup).outputs
    return {**batch, "teacher": [outputs[int(n)] for n in batch["line"]]}


def attach_teacher_outputs(datasets: dict, cfg) -> dict:
    """Add the ``teacher`` column to ``train_<task>`` of every task with teacher outputs (after
    checking they cover every training line: the driver reads the ``line`` columns only)."""
    for task, out_dir in cfg.distill.teacher_outputs.items():
        kind = head_kind(TASKS[task], cfg.model.mode_of(task) if TASKS[task].is_pair else None)
        kinds = check_teacher_outputs(out_dir, task, cfg.data, kind)
        have = set(pq.read_table(Path(out_dir) / "parquet", columns=["line"]).column("line").to_pylist())
        missing = set()
        for batch in datasets[f"train_{task}"].select_columns(["line"]).iter_batches(batch_size=4096, batch_format="numpy"):
            missing |= {int(n) for n in batch["line"]} - have
        if missing:
            raise DataError(f"teacher outputs {out_dir} have no row for {len(missing)} training line(s) of "
                            f"{task}, e.g. {sorted(missing)[:10]}")
        lookup = (TeacherLookup, {"out_dir": str(out_dir), "task": task, "kinds": list(kinds)})
        datasets[f"train_{task}"] = datasets[f"train_{task}"].map_batches(   # streamed, beside the workers
            with_teacher, fn_kwargs={"lookup": lookup}, batch_size=1024, batch_format="numpy", num_cpus=0)
    return datasets
