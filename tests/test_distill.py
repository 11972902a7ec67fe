"""Related data sets, distillation losses, teacher outputs and the staged pipeline."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raymtl.config import MTLConfig, smoke
from raymtl.data.readers import DataError
from raymtl.data.related import drop_overlap, map_row, read_related, related_rows
from raymtl.objectives.multitask import kd_kl_loss, kd_mse_loss, set_cross_entropy, task_loss

pytestmark = pytest.mark.timeout(900)


# ------------------------------------------------------------------ losses on hand-made logits
def test_equal_logits_give_zero_kl():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    for t in (0.5, 1.0, 4.0):
        assert kd_kl_loss(logits, logits.clone(), t).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_is_scaled_by_t_squared():
    student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    for t in (1.0, 2.0, 5.0):
        p = np.exp(np.array([0.0, 2.0]) / t); p /= p.sum()            # teacher, softened
        q = np.exp(np.array([1.0, 0.0]) / t); q /= q.sum()            # student, softened
        by_hand = t * t * float(np.sum(p * np.log(p / q)))
        assert kd_kl_loss(student, teacher, t).item() == pytest.approx(by_hand, rel=1e-5)


def test_set_cross_entropy():
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0, 0.5], [0.2, 0.1, 3.0, 0.0, 0.0]])
    one_hot = torch.tensor([1 << 1, 1 << 2])                           # classes 1 and 2
    assert set_cross_entropy(logits, one_hot).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([1, 2])).item(), rel=1e-6)
    negative = torch.tensor([0b00011, 0b00011])                        # {very negative, negative}
    p = F.softmax(logits, -1)
    assert set_cross_entropy(logits, negative).item() == pytest.approx(
        -torch.log(p[:, 0] + p[:, 1]).mean().item(), rel=1e-6)


def test_task_loss_mixes_hard_and_soft_by_alpha():
    out = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    batch = {"label": torch.tensor([0.0, 0.0]), "teacher": torch.tensor([[0.0, 3.0], [0.0, 3.0]])}
    hard = F.cross_entropy(out, torch.tensor([0, 0])).item()
    soft = kd_kl_loss(out, batch["teacher"], 2.0).item()
    assert task_loss("classifier", out, batch, 0.0, 2.0).item() == pytest.approx(hard)
    assert task_loss("classifier", out, batch, 1.0, 2.0).item() == pytest.approx(soft)
    assert task_loss("classifier", out, batch, 0.25, 2.0).item() == pytest.approx(0.25 * soft + 0.75 * hard)
    cos = torch.tensor([0.2, 0.9])
    sts = {"label": torch.tensor([1.0, 4.0]), "teacher": torch.tensor([[0.3], [0.7]])}
    assert task_loss("cosine", cos, sts, 1.0).item() == pytest.approx(kd_mse_loss(cos, sts["teacher"]).item())


def test_teacher_annealing_moves_the_stage_loss_from_teacher_to_gold_labels():
    from raymtl.stages.multitask import MTLStage
    cfg = smoke().replace(tasks=("sst",), steps=10, distill_alpha=0.8, distill_schedule="anneal")
    stage = MTLStage(cfg, {"sst": 10})             # loss() needs no build_model() first
    out = torch.tensor([[1.0, 0.0, 0.5, -1.0, 0.2], [0.0, 1.0, 0.0, 0.3, 2.0]])
    batch = {"label": torch.tensor([0, 4]), "teacher": torch.tensor([[0.0, 3.0, 0, 0, 0], [1.0, 0, 0, 0, 2.0]])}
    hard = F.cross_entropy(out, batch["label"]).item()
    soft = kd_kl_loss(out, batch["teacher"], cfg.distill.distill_temperature).item()
    for step, alpha in ((0, 0.8), (5, 0.4), (10, 0.0)):
        got = stage.loss(lambda task, b: out, "sst", batch, step).item()
        assert got == pytest.approx(alpha * soft + (1 - alpha) * hard, rel=1e-6), step
    constant = MTLStage(cfg.replace(distill_schedule="constant"), {"sst": 10})
    assert constant.loss(lambda task, b: out, "sst", batch, 10).item() == pytest.approx(0.8 * soft + 0.2 * hard, rel=1e-6)
    with pytest.raises(ValueError, match="distill_schedule"):
        cfg.replace(distill_schedule="cosine")


def test_a_teachers_config_does_not_depend_on_the_students_distillation_settings():
    from raymtl.stages.pipeline import teacher_config
    student = MTLConfig()
    distilling = student.replace(teacher_outputs={"sst": "somewhere"}, distill_alpha=1.0,
                                 distill_temperature=4.0, distill_schedule="anneal")
    teacher = teacher_config(distilling, "sst")
    assert teacher.to_dict() == teacher_config(student, "sst").to_dict()   # same stage key
    assert teacher.distill.teacher_outputs == {} and teacher.data.tasks == ("sst",)


# ------------------------------------------------------------------ related sets: label spaces
def test_related_sets_map_into_the_target_label_space(data_dir):
    sst2, _ = read_related("sst2", data_dir, max_rows=200)
    assert {r["label_set"] for r in sst2} == {0b00011, 0b11000}        # neg -> {0,1}, pos -> {3,4}
    assert all(r["label"] == -1.0 for r in sst2)                       # no exact SST class is guessed
    mrpc, reports = read_related("mrpc", data_dir, max_rows=200)       # BOM header, '#1 String' columns
    assert {r["label"] for r in mrpc} == {0.0, 1.0} and not reports[0].bad
    assert all(r["text_a"] and r["text_b"] for r in mrpc)
    sick, _ = read_related("sick", data_dir, max_rows=200)
    assert min(r["label"] for r in sick) >= 0 and max(r["label"] for r in sick) <= 5
    from raymtl.data.related import RELATED
    assert map_row(RELATED["sick"], {"label": 1.0})["label"] == 0.0
    assert map_row(RELATED["sick"], {"label": 5.0})["label"] == 5.0
    assert map_row(RELATED["sick"], {"label": 4.5})["label"] == pytest.approx(4.375)
    mr, _ = read_related("mr", data_dir, max_rows=50)
    assert {r["label_set"] for r in mr} == {0b00011, 0b11000}


def test_related_rows_drop_overlap_with_validation():
    held = [{"text_a": "A Gorgeous , witty film .", "text_b": ""}]
    rows = [{"text_a": "gorgeous , witty film", "text_b": ""},   # a phrase of a held-out sentence
            {"text_a": "witty", "text_b": ""},                   # too short to say
            {"text_a": "a dull film", "text_b": ""}]
    kept, dropped = drop_overlap(rows, held)
    assert dropped == 1 and [r["text_a"] for r in kept] == ["witty", "a dull film"]


def test_related_config_is_checked(data_dir):
    with pytest.raises(ValueError, match="unknown related data set"):
        MTLConfig().replace(related_sets=("imdb",))
    with pytest.raises(ValueError, match="not in tasks"):
        MTLConfig().replace(tasks=("sst",), related_sets=("sick",))
    with pytest.raises(ValueError, match="distill_alpha"):
        MTLConfig().replace(distill_alpha=1.5)
    with pytest.raises(ValueError, match="not for task|is for task"):
        related_rows("sts", ("mrpc",), data_dir, [])


def test_the_pipelines_teacher_samples_like_jobs_teacher_not_like_its_student(tmp_path, data_dir):
    """A temperature-sampled student must not give its teacher's task a quarter of the steps
    beside the large related stream: the teacher trains round robin, as jobs/teacher.py does."""
    from raymtl import recipes
    from raymtl.stages.pipeline import PipelinePlan
    student = smoke().replace(data_dir=data_dir, num_workers=1, sampling="temperature")
    (teacher,) = [st for st in PipelinePlan(student, output=str(tmp_path)).stages({}) if st.name == "teacher-sst"]
    cfg = teacher.inputs["config"]
    assert cfg["train"]["sampling"] == recipes.teacher().train.sampling == "round_robin"
    assert tuple(cfg["data"]["related_sets"]) == ("sst2", "cfimdb") and cfg["train"]["fusion"] == "sum"


def test_the_pipelines_pretraining_stage_takes_its_objectives_from_a_config_file(tmp_path, data_dir):
    from raymtl.stages.pipeline import PipelinePlan
    student = smoke().replace(data_dir=data_dir, num_workers=1)
    assert PipelinePlan(student, output=str(tmp_path)).stages({})[0].name != "pretrain"      # off by default
    (tmp_path / "pt.json").write_text(json.dumps({"pretrain": {"mlm_weight": 0.5, "simcse_unsup_weight": 1.0},
                                                   "train": {"steps": 7, "lr": 1e-4}}))
    for steps, want in ((0, 7), (5, 5)):                      # the file's steps unless pretrain_steps is given
        plan = PipelinePlan(student, output=str(tmp_path), pretrain_steps=steps, pretrain_config=str(tmp_path / "pt.json"))
        pre = plan.stages({})[0]
        cfg = pre.inputs["config"]
        assert pre.name == "pretrain" and cfg["train"]["steps"] == want and cfg["train"]["lr"] == 1e-4
        assert (cfg["pretrain"]["mlm_weight"], cfg["pretrain"]["simcse_unsup_weight"]) == (0.5, 1.0)
        assert cfg["pretrain"]["head_warmup_steps"] == 100                     # recipes.pretrain()'s, not named
        assert cfg["model"]["encoder"] == student.model.encoder                 # the student's encoder
    (tmp_path / "bad.json").write_text(json.dumps({"pretrain": {"mlm_weight": -1}}))
    with pytest.raises(ValueError, match="bad.json.*mlm_weight"):
        PipelinePlan(student, output=str(tmp_path), pretrain_config=str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        PipelinePlan(student, output=str(tmp_path), pretrain_config=str(tmp_path / "missing.json"))


# ------------------------------------------------------------------ the pipeline, end to end
@pytest.fixture(scope="module")
def pipeline_run(ray_cluster, data_dir, tmp_path_factory):
    from raymtl.stages.pipeline import PipelinePlan
    out = tmp_path_factory.mktemp("pipeline")
    student = smoke().replace(data_dir=data_dir, max_rows=240, steps=8, eval_every=8, log_every=4,
                              num_workers=1, cpus_per_worker=1.0)
    plan = PipelinePlan(student, output=str(out), pretrain_steps=4, teacher_steps=6,
                        teacher_tasks=("sst", "sts"), smoke=True, teacher_margin=0,      # distil both
                        teacher_pair_mode="cross")     # STS's teacher a cross-encoder, the student a bi-encoder
    return plan, plan.run(), out


def test_pipeline_runs_every_stage_and_feeds_checkpoints(pipeline_run):
    plan, results, out = pipeline_run
    assert list(results) == ["pretrain", "teacher-sst", "teacher-sts", "mtl"]
    pre = results["pretrain"]["checkpoint"]
    for name in ("teacher-sst", "teacher-sts", "mtl"):
        cfg = json.loads((out / name / "stage.json").read_text())
        assert cfg["key"] and cfg["result"]["checkpoint"]
    used = json.loads(open(f"{results['mtl']['checkpoint']}/config.json").read())
    assert used["model"]["init_from"] == pre                              # pretrain -> student
    (warm,) = (out / "pretrain").glob("*/pretrain-head/best_metrics.json")   # the recipe warms the MLM head first
    assert json.loads(warm.read_text())["config"]["pretrain"]["train_only_head"]
    assert set(used["distill"]["teacher_outputs"]) == {"sst", "sts"}      # teachers -> student
    teacher_cfg = json.loads(open(f"{results['teacher-sst']['checkpoint']}/config.json").read())
    assert teacher_cfg["model"]["init_from"] == pre and teacher_cfg["data"]["related_sets"] == ["sst2", "cfimdb"]
    for m in ("val_sst", "val_quora", "val_sts", "overall"):
        assert math.isfinite(results["mtl"]["metrics"][m])


def test_teacher_outputs_cover_the_train_file_and_are_checked(pipeline_run, data_dir):
    from raymtl.stages.distill import load_teacher_outputs
    plan, results, _ = pipeline_run
    out = results["teacher-sst"]["outputs"]
    meta = json.loads(open(f"{out}/meta.json").read())
    assert meta["rows"] == 216 and meta["head_kind"] == "classifier"              # the 240 rows' training split
    lookup = load_teacher_outputs(out, "sst", plan.student.data, "classifier")
    assert len(lookup) == 216 and all(v.shape == (5,) and np.isfinite(v).all() for v in lookup.values())
    cross = json.loads(open(f"{results['teacher-sts']['outputs']}/meta.json").read())
    assert cross["head_kind"] == "regression"                 # the cross-encoder teacher scores 0-5 ...
    scores = load_teacher_outputs(results["teacher-sts"]["outputs"], "sts", plan.student.data, "regression")
    sts = load_teacher_outputs(results["teacher-sts"]["outputs"], "sts", plan.student.data, "cosine")
    assert all(v.shape == (1,) and -1.0001 <= v[0] <= 1.0001 for v in sts.values())    # ... the student, cosines
    line = next(iter(scores))
    assert sts[line][0] == pytest.approx(min(max(scores[line][0] / 2.5 - 1, -1), 1), abs=1e-5)
    other_split = plan.student.replace(split_seed=7).data
    with pytest.raises(DataError, match="split_seed"):
        load_teacher_outputs(out, "sst", other_split, "classifier")
    with pytest.raises(DataError, match="no mapping between them"):
        load_teacher_outputs(results["teacher-sts"]["outputs"], "sts", plan.student.data, "classifier")


def test_rerun_skips_finished_stages_and_force_redoes_one(pipeline_run, capsys):
    plan, results, out = pipeline_run
    before = {n: (out / n / "stage.json").stat().st_mtime for n in results}
    again = plan.run()
    assert again == results                                    # the recorded results, nothing retrained
    assert capsys.readouterr().out.count("already done for these inputs and config") == 4
    assert {n: (out / n / "stage.json").stat().st_mtime for n in results} == before
    with pytest.raises(ValueError, match="unknown stage"):
        plan.run(force={"teacher-nope"})


def test_force_redoes_a_stage_and_the_stages_after_it(pipeline_run):
    plan, results, out = pipeline_run
    before = {n: json.loads((out / n / "stage.json").read_text()) for n in results}
    plan.run(force={"teacher-sts"})
    after = {n: json.loads((out / n / "stage.json").read_text()) for n in results}
    for n in ("pretrain", "teacher-sst"):
        assert after[n] == before[n]                                   # untouched
    for n in ("teacher-sts", "mtl"):
        assert after[n]["key"] == before[n]["key"] and after[n]["finished"] > before[n]["finished"]
    key = before["teacher-sts"]["key"]
    assert list((out / "teacher-sts").glob(f"{key}.replaced-*"))       # the old run is kept
    assert list((out / "mtl").glob(f"{before['mtl']['key']}.replaced-*"))   # mtl was trained again, the old run kept


def test_failed_stage_is_named_and_keeps_finished_ones(pipeline_run, tmp_path):
    from raymtl.stages.pipeline import PipelinePlan, StageFailed
    plan, results, out = pipeline_run
    bad = PipelinePlan(plan.student.replace(data_dir=str(tmp_path)), output=str(out), pretrain_steps=0,
                       teacher_steps=6, teacher_tasks=("sst",), smoke=True)
    with pytest.raises(StageFailed, match="stage 'teacher-sst' failed"):
        bad.run()
    assert (out / "teacher-sst" / "stage.json").is_file() and (out / "mtl" / "stage.json").is_file()


def test_evaluate_reads_the_final_checkpoint(pipeline_run, capsys):
    from raymtl.cli import main as raymtl_main
    _, _, out = pipeline_run
    final = json.loads((out / "mtl" / "stage.json").read_text())["result"]["checkpoint"]
    assert raymtl_main(["evaluate", "--checkpoint", final]) == 0
    table = capsys.readouterr().out
    assert "SST accuracy" in table and "STS Pearson" in table and "overall" in table


def test_the_teacher_margin_rule_compares_with_the_plain_student_and_skips_short_teachers(pipeline_run, capsys):
    import dataclasses
    plan, results, out = pipeline_run
    strict = dataclasses.replace(plan, teacher_margin=100.0)     # no teacher beats its student 100-fold
    again = strict.run()
    assert list(again) == ["pretrain", "teacher-sst", "teacher-sts", "mtl-plain", "mtl"]
    printed = capsys.readouterr().out
    plain = again["mtl-plain"]["metrics"]
    for t in ("sst", "sts"):
        teacher = again[f"teacher-{t}"]["metrics"][f"val_{t}"]
        needed = plain[f"val_{t}"] + 100 * abs(plain[f"val_{t}"])
        assert f"{t:<8}{teacher:>10.4f}{plain[f'val_{t}']:>10.4f}{needed:>10.4f}  skipped: short of the margin" in printed
    assert "no teacher passed the margin" in printed
    assert again["mtl"]["checkpoint"] == again["mtl-plain"]["checkpoint"] and again["mtl"]["teachers"] == []
    used = json.loads(open(f"{again['mtl']['checkpoint']}/config.json").read())
    assert used["distill"]["teacher_outputs"] == {}
    with pytest.raises(ValueError, match="teacher_margin=-0.1 must be >= 0"):
        dataclasses.replace(plan, teacher_margin=-0.1)


def test_the_student_can_start_from_a_teacher(pipeline_run, capsys):
    """STILTs in the pipeline: with student_from_teacher the students start from that teacher's
    checkpoint; the stages before it are reused, the student's key changes."""
    import dataclasses
    plan, results, out = pipeline_run
    before = json.loads((out / "mtl" / "stage.json").read_text())
    stilts = dataclasses.replace(plan, student_from_teacher="sst")
    again = stilts.run()
    assert capsys.readouterr().out.count("already done for these inputs and config") == 3   # pretrain, both teachers
    after = json.loads((out / "mtl" / "stage.json").read_text())
    assert after["key"] != before["key"] and after["inputs"]["student_from_teacher"] == "sst"
    used = json.loads(open(f"{again['mtl']['checkpoint']}/config.json").read())
    assert used["model"]["init_from"] == again["teacher-sst"]["checkpoint"] != again["pretrain"]["checkpoint"]
    with pytest.raises(ValueError, match="not one of teacher_tasks"):
        dataclasses.replace(plan, student_from_teacher="quora")
    with pytest.raises(ValueError, match="another head than the student's"):
        dataclasses.replace(plan, student_from_teacher="sts")       # its teacher is a cross-encoder
    assert dataclasses.replace(plan, student_from_teacher="sts", teacher_pair_mode="bi").student_from_teacher   # same head
