import json

import pytest

from raymtl.config import MTLConfig, smoke
from raymtl.methods.sampling import SAMPLERS
from raymtl.train.engine import deepspeed_config


@pytest.mark.parametrize("field,value,message", [
    ("zero_stage", 4, r"zero_stage=4 is not valid; choose one of \[0, 1, 2, 3\]"),
    ("worker_niceness", 20, r"worker_niceness=20 must be an integer in 0..19"),
    ("worker_niceness", -1, r"worker_niceness=-1 must be an integer in 0..19"),
    ("sampling", "lottery", r"sampling='lottery' is not valid; choose one of \['annealed'"),
    ("tasks", ("sst", "mnli"), r"tasks='mnli' is not valid"),
    ("lr", -1.0, r"lr=-1.0 must be > 0"),
    ("val_fraction", 1.5, r"val_fraction=1.5 must be in \(0, 1\)"),
    ("pair_mode", {"sts": "siamese"}, r"pair_mode\[sts\]='siamese' is not valid"),
    ("task_pooling", {"sst": "max"}, r"task_pooling\[sst\]='max' is not valid"),
    ("task_pooling", {"mnli": "cls"}, r"task_pooling task='mnli' is not valid"),
    ("task_layers", {"sst": 0}, r"task_layers\[sst\]=0 must be > 0"),
    ("task_layers", {"sst": "1.5"}, r"task_layers\[sst\]='1.5' is neither a whole number nor one of \['half'\]"),
    ("task_layers", {"nli": 1}, r"task_layers task='nli' is not valid"),
    ("cagrad_c", -0.1, r"cagrad_c=-0.1 must be >= 0"),
    ("sampling_temperature", 0.0, r"sampling_temperature=0.0 must be > 0"),
    ("dwa_window", 0, r"dwa_window=0 must be > 0"),
    ("dwa_temperature", -1.0, r"dwa_temperature=-1.0 must be > 0"),
    ("grad_accum", 2, r"grad_accum=2 with fusion='imtl_g': the loop fuses each micro-batch's per-task "
                      r"gradients on its own.*use grad_accum=1 \(--grad-accum 1\), or fusion='sum'"),
    ("precision", "fp16", r"precision='fp16' needs use_gpu=True"),
    ("placement_strategy", "ANYWHERE", r"placement_strategy='ANYWHERE' is not valid; choose one of \['PACK'"),
    ("batch_size", 33, r"batch_size=33 must be divisible by num_workers x grad_accum = 2"),
    ("no_such_field", 1, r"unknown config field 'no_such_field'; valid fields: \["),
])
def test_bad_values_name_the_field(field, value, message):
    overrides = {field: value}
    if field == "batch_size":
        overrides["num_workers"] = 2
    with pytest.raises(ValueError, match=message):
        MTLConfig().replace(**overrides)


def test_round_trip_through_a_file(tmp_path):
    cfg = smoke().replace(lr=3e-4, tasks=("sst", "sts"))
    cfg.save(tmp_path / "c.json")
    assert MTLConfig.load(tmp_path / "c.json") == cfg
    (tmp_path / "flat.json").write_text(json.dumps({"lr": 1e-4, "zero_stage": 2}))
    flat = MTLConfig.load(tmp_path / "flat.json")
    assert flat.train.lr == 1e-4 and flat.scale.zero_stage == 2
    (tmp_path / "broken.json").write_text('{"lr": 1e-4,\n oops}')
    with pytest.raises(ValueError, match=r"broken.json:2: not valid JSON"):
        MTLConfig.load(tmp_path / "broken.json")


def test_derived_batch_numbers_and_deepspeed_config():
    cfg = MTLConfig().replace(batch_size=32, num_workers=2, grad_accum=2, zero_stage=2, fusion="sum")
    assert cfg.micro_batch_size() == 8
    ds = deepspeed_config(cfg, [5e-5, 5e-5, 1e-3])
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2 and ds["optimizer"]["params"]["torch_adam"]
    assert ds["scheduler"]["params"]["warmup_max_lr"] == [5e-5, 5e-5, 1e-3]
    assert ds["gradient_clipping"] == 1.0


def test_accumulation_is_refused_with_per_task_fusion_only():
    for fusion in ("imtl_g", "pcgrad", "cagrad"):
        with pytest.raises(ValueError, match=rf"grad_accum=4 with fusion='{fusion}'"):
            MTLConfig().replace(grad_accum=4, fusion=fusion, fusion_every=1)
    summed = MTLConfig().replace(grad_accum=4, fusion="sum", diagnostics=True)   # linear: accumulates exactly
    assert summed.train.grad_accum == 4 and summed.micro_batch_size() == 8
    assert MTLConfig().train.grad_accum == 1                                      # the default run fuses


def test_removed_options_are_unknown_fields():
    for name in ("task_norm", "clip_scope"):
        with pytest.raises(ValueError, match=rf"unknown config field '{name}'"):
            MTLConfig().replace(**{name: "none"})


def test_job_flags_map_onto_config_fields():
    import argparse

    from raymtl.cli import add_config_args, config_from_args
    p = argparse.ArgumentParser()
    add_config_args(p)
    cfg = config_from_args(p.parse_args(["--smoke", "--lr", "0.01", "--tasks", "sst,sts",
                                         "--pair-mode", "sts=cross", "--use-gpu", "--zero-stage", "1"]))
    assert cfg.model.encoder == "tiny-random" and cfg.train.lr == 0.01
    assert cfg.data.tasks == ("sst", "sts") and cfg.model.mode_of("sts") == "cross"
    assert cfg.scale.use_gpu and cfg.scale.zero_stage == 1


@pytest.mark.parametrize("flags", [[], ["--output", "OUT"], ["--pipeline-output", "OUT"], ["--config", "FILE"]])
def test_the_pipeline_job_writes_under_output(flags, tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    from raymtl.stages.pipeline import PipelinePlan
    (tmp_path / "c.json").write_text(json.dumps({"output": str(tmp_path / "OUT")}))
    flags = [str(tmp_path / "c.json") if f == "FILE" else str(tmp_path / f) if f == "OUT" else f for f in flags]
    seen = []

    def run(plan, force=False):                                  # the stages' runs: not here
        seen.append(plan.output)
        return {"mtl": {"checkpoint": "CKPT", "metrics": {}}}
    monkeypatch.setattr(PipelinePlan, "run", run)
    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "jobs" / "pipeline.py"), run_name="job")["main"]
    assert main(["--smoke", *flags]) == 0
    assert seen == [str(tmp_path / "OUT") if flags else "runs/pipeline"]


def test_the_pipeline_student_starts_from_its_preset(monkeypatch):
    import runpy
    from pathlib import Path

    from raymtl.recipes import RECIPES
    from raymtl.stages.pipeline import PipelinePlan
    students = []

    def run(plan, force=False):                                  # the stages' runs: not here
        students.append(plan.student)
        return {"mtl": {"checkpoint": "CKPT", "metrics": {}}}
    monkeypatch.setattr(PipelinePlan, "run", run)
    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "jobs" / "pipeline.py"), run_name="job")["main"]
    assert main(["--preset", "hour", "--lr", "3e-5"]) == 0 and main([]) == 0
    hour, default = students
    assert (hour.train.steps, hour.train.early_stop, hour.scale.precision) == (1800, 4, "auto") == (
        RECIPES["hour"]().train.steps, RECIPES["hour"]().train.early_stop, RECIPES["hour"]().scale.precision)
    assert hour.train.lr == 3e-5 and hour.run.output == default.run.output == "runs/pipeline"   # flags on top
    assert default.train.steps == RECIPES["mtl"]().train.steps
    with pytest.raises(SystemExit):
        main(["--preset", "single-sst"])                         # a student is multi-task


def test_the_pipeline_students_start_from_the_sst_teacher_by_default(monkeypatch, capsys):
    import runpy
    from pathlib import Path

    from raymtl.stages.pipeline import PipelinePlan
    plans = []

    def run(plan, force=False):                                  # the stages' runs: not here
        plans.append(plan)
        return {"mtl": {"checkpoint": "CKPT", "metrics": {}}}
    monkeypatch.setattr(PipelinePlan, "run", run)
    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "jobs" / "pipeline.py"), run_name="job")["main"]
    for argv in ([], ["--student-from-teacher", ""], ["--tasks", "quora,sts"], ["--teacher-tasks", "sts"]):
        assert main(argv) == 0
    assert [(p.teacher_tasks, p.student_from_teacher) for p in plans] == [
        (("sst",), "sst"), (("sst",), ""), (("quora", "sts"), ""), (("sts",), "")]
    with pytest.raises(SystemExit):
        main(["--student-from-teacher", "quora"])                # quora has no teacher here
    assert "student_from_teacher='quora': not one of teacher_tasks ['sst']" in capsys.readouterr().err


def test_a_config_file_sets_its_own_fields_over_a_stage_default(tmp_path):
    import argparse

    from raymtl.cli import add_config_args, config_from_args
    from raymtl.recipes import teacher as teacher_defaults
    p = argparse.ArgumentParser()
    add_config_args(p)
    (tmp_path / "flat.json").write_text(json.dumps({"fusion": "imtl_g", "lr": 1e-4}))
    (tmp_path / "nested.json").write_text(json.dumps({"train": {"fusion": "imtl_g"}}))
    for f in ("flat.json", "nested.json"):
        # imtl_g is MTLConfig's default, but a teacher's is sum: the file's explicit value wins
        cfg = config_from_args(p.parse_args(["--config", str(tmp_path / f)]), defaults=teacher_defaults)
        assert cfg.train.fusion == "imtl_g" and cfg.train.fusion_every == 1
    assert cfg.train.lr == teacher_defaults().train.lr               # fields the file leaves out keep the stage's
    flagged = config_from_args(p.parse_args(["--config", str(tmp_path / "flat.json"), "--lr", "0.02"]))
    assert flagged.train.lr == 0.02                                  # flags override the file


def test_samplers():
    import random
    sizes = {"sst": 100, "quora": 10000, "sts": 100}
    assert SAMPLERS["round_robin"](sizes, 0, 10, random.Random(0)) == ["sst", "quora", "sts"]
    draws = [SAMPLERS["proportional"](sizes, 0, 10, random.Random(i))[0] for i in range(200)]
    assert draws.count("quora") > 180
    late = [SAMPLERS["annealed"](sizes, 9, 10, random.Random(i))[0] for i in range(300)]
    assert late.count("quora") < 200  # annealed towards uniform


def test_a_field_added_after_a_run_matches_that_run_only_at_its_default():
    """A run saved before a field existed trained as the field's default does: reading it back
    (fit_once) or resuming it with the default matches; any other value is a difference."""
    from raymtl.train.trainer import config_differences, default_dict
    cfg = MTLConfig()
    saved = json.loads(json.dumps(cfg.to_dict()))
    del saved["train"]["smart_weight"]                       # written before SMART was built
    asked = json.loads(json.dumps(cfg.to_dict()))
    assert config_differences(saved, asked, default_dict(cfg)) == []
    on = json.loads(json.dumps(cfg.replace(smart_weight=1.0).to_dict()))
    assert config_differences(saved, on, default_dict(cfg)) == ["smart_weight: saved '(absent)', asked 1.0"]
    assert config_differences(saved, asked) == ["smart_weight: saved '(absent)', asked 0.0"]   # no defaults given


def test_a_saved_config_with_a_retired_field_loads_only_at_its_no_op_value():
    from raymtl.config import RETIRED_FIELDS
    from raymtl.train.trainer import config_differences
    assert RETIRED_FIELDS["average_last"][0] == 0
    cfg = smoke()
    saved = json.loads(json.dumps(cfg.to_dict()))
    saved["train"]["average_last"] = 0                        # written while raymtl had the field, off
    assert MTLConfig.from_dict(saved) == cfg and MTLConfig().replace(lr=1e-4) == MTLConfig.from_dict(
        {"lr": 1e-4, "average_last": 0})
    assert config_differences(saved, json.loads(json.dumps(cfg.to_dict()))) == []
    saved["train"]["average_last"] = 3                        # it did something: refused, named
    with pytest.raises(ValueError, match=r"average_last=3: no longer a raymtl field .*only 0 \(off\) loads"):
        MTLConfig.from_dict(saved)
    assert config_differences(saved, json.loads(json.dumps(cfg.to_dict()))) == ["average_last: saved 3, asked '(absent)'"]
