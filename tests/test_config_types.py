"""``MTLConfig.from_dict`` / ``replace`` / ``load`` check every value against its field's
annotated type and name the field (and the file); the command line's values still pass."""
import argparse
import json
import re

import pytest

from raymtl.cli import add_config_args, config_from_args, main
from raymtl.config import MTLConfig, smoke
from raymtl.stages.pretrain import PretrainJobConfig
from raymtl.stages.relations import RelationsJobConfig

BAD = [   # a config file's contents, what the error says
    ({"steps": "five"}, r"field 'steps' must be an integer, got 'five'"),
    ({"steps": True}, r"field 'steps' must be an integer, got true"),
    ({"max_length": 12.5}, r"field 'max_length' must be an integer, got 12.5"),
    ({"max_length": 3.0}, r"field 'max_length' must be an integer, got 3.0"),
    ({"pals": "no"}, r"field 'pals' must be true or false, got 'no'"),
    ({"pals": 0}, r"field 'pals' must be true or false, got 0"),
    ({"lr": True}, r"field 'lr' must be a number, got true"),
    ({"encoder": 5}, r"field 'encoder' must be a string, got 5"),
    ({"init_from": None}, r"field 'init_from' must be a string, got null"),
    ({"tasks": "sst"}, r"field 'tasks' must be a list of strings, got 'sst'"),
    ({"tasks": ["sst", 3]}, r"field 'tasks\[1\]' must be a string, got 3"),
    ({"pair_mode": ["sts"]}, r"field 'pair_mode' must be an object \(key: value\), got a list \['sts'\]"),
    ({"task_weights": {"sst": True}}, r"field 'task_weights\[sst\]' must be a number, got true"),
    ({"task_layers": {"sst": 1.5}}, r"field 'task_layers\[sst\]' must be an integer or a string, got 1.5"),
    ({"train": {"steps": "five"}}, r"field 'steps' must be an integer, got 'five'"),      # nested form
    ({"train": 5}, r"section 'train' must be an object of fields, got 5"),
]


@pytest.mark.parametrize("content,says", BAD, ids=[json.dumps(c) for c, _ in BAD])
def test_a_config_file_of_wrong_types_names_the_file_and_the_field(content, says, tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(f))}: {says}$"):
        MTLConfig.load(f)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(f))}: {says}$"):      # over a job's defaults too
        MTLConfig.load(f, over=smoke())
    with pytest.raises(ValueError, match=rf"^{says}$"):
        MTLConfig.from_dict(content)


@pytest.mark.parametrize("top", [[{"steps": 5}], "steps", 5, None])
def test_a_config_file_that_is_not_an_object_is_refused(top, tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps(top))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(f))}: a config file holds one JSON object of fields"):
        MTLConfig.load(f)
    with pytest.raises(ValueError, match=r"^a config is an object of fields, got"):
        MTLConfig.from_dict(top)


def test_replace_checks_types_too():
    with pytest.raises(ValueError, match=r"^field 'steps' must be an integer, got '5'$"):
        MTLConfig().replace(steps="5")
    with pytest.raises(ValueError, match=r"^field 'use_gpu' must be true or false, got 'yes'$"):
        MTLConfig().replace(use_gpu="yes")


def test_the_stages_own_sections_are_checked():
    with pytest.raises(ValueError, match=r"^field 'mlm_weight' must be a number, got 'x'$"):
        PretrainJobConfig().replace(mlm_weight="x")
    with pytest.raises(ValueError, match=r"^field 'joint_steps' must be an integer, got 2.5$"):
        RelationsJobConfig().replace(joint_steps=2.5)


def test_right_types_pass():
    cfg = MTLConfig.from_dict({"lr": 1, "tasks": ["sst", "sts"], "pal_tasks": ("sts",), "pals": False,
                               "task_weights": {"sst": 2, "sts": "0.5"}, "task_layers": {"sst": "2"}})
    assert cfg.train.lr == 1 and cfg.data.tasks == ("sst", "sts") and not cfg.model.pals
    assert cfg.train.task_weights == {"sst": 2.0, "sts": 0.5} and cfg.model.task_layers == {"sst": 2}


@pytest.mark.parametrize("kind", [MTLConfig, PretrainJobConfig, RelationsJobConfig])
def test_saved_configs_load_back(kind, tmp_path):
    cfg = smoke(kind()).replace(tasks=("sst", "sts"), task_weights={"sst": 2.0}, pair_mode={"sts": "cross"})
    cfg.save(tmp_path / "config.json")        # tuples as JSON lists, dicts as objects
    assert kind.load(tmp_path / "config.json") == cfg


def test_flags_of_every_type_still_parse():
    p = argparse.ArgumentParser()
    add_config_args(p)
    cfg = config_from_args(p.parse_args(["--smoke", "--steps", "7", "--lr", "0.01", "--no-pals", "--tasks", "sst,sts",
                                         "--task-weights", "sst=2", "--task-layers", "sst=1", "--pair-mode",
                                         "sts=cross", "--cpus-per-worker", "1"]))
    assert cfg.train.steps == 7 and cfg.train.lr == 0.01 and cfg.model.pals is False
    assert cfg.data.tasks == ("sst", "sts") and cfg.train.task_weights == {"sst": 2.0}
    assert cfg.model.task_layers == {"sst": 1} and cfg.model.mode_of("sts") == "cross"
    assert cfg.scale.cpus_per_worker == 1.0


def test_the_cli_prints_the_type_error(tmp_path, capsys):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"steps": "five"}))
    assert main(["relations", "--smoke", "--config", str(f)]) == 2       # refused before anything runs
    assert capsys.readouterr().err.strip() == f"error: {f}: field 'steps' must be an integer, got 'five'"
