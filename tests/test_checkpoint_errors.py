"""A damaged checkpoint fails with one ``CheckpointError`` that names the file and what is wrong,
never a library's traceback; ``raymtl predict`` prints it as one ``error:`` line."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import raymtl
from raymtl.cli import main
from raymtl.config import smoke
from raymtl.models.encoder import tokenizer_source
from raymtl.models.multitask import CheckpointError, MultiTaskModel
from raymtl.models.pretrain import PretrainModel


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = smoke()
    model = MultiTaskModel.from_config(cfg.model, ["sst", "quora", "sts"])
    d = tmp_path_factory.mktemp("ckpt")
    model.save(d, AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.encoder)), extra={"max_length": 32})
    return d


def truncate(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])


def rewrite_weights(file, change):
    state = load_file(str(file))
    change(state)
    save_file(state, str(file), metadata={"format": "pt"})


def drop_one(state, prefix):
    del state[next(k for k in sorted(state) if k.startswith(prefix))]


def reshape_one(state, prefix):
    key = next(k for k in sorted(state) if k.startswith(prefix) and state[k].numel() > 1)
    state[key] = torch.zeros(3)


# damaged file (relative to the checkpoint), how it is damaged, what the error says about it
DAMAGES = {
    "heads truncated": ("heads.safetensors", lambda f: truncate(f),
                        r"is not a readable safetensors file \(.*incomplete metadata.*\); it is damaged or truncated"),
    "heads missing": ("heads.safetensors", lambda f: f.unlink(), r"is missing"),
    "head weight missing": ("heads.safetensors", lambda f: rewrite_weights(f, lambda s: drop_one(s, "heads.sst.")),
                            r"lacks \['heads\.sst\..*'\], which .*raymtl\.json says the checkpoint has"),
    "head weight of another shape": ("heads.safetensors",
                                     lambda f: rewrite_weights(f, lambda s: reshape_one(s, "heads.sst.")),
                                     r"holds heads\.sst\.\S+ \[3\] \(model: \[\d+\]\), of other shapes than the model"),
    "encoder weights missing": ("encoder/model.safetensors", lambda f: f.unlink(), r"is missing"),
    "encoder weights truncated": ("encoder/model.safetensors", lambda f: truncate(f, 0.9),
                                  r"is not a readable safetensors file"),
    "an encoder weight missing": ("encoder", lambda d: rewrite_weights(d / "model.safetensors",
                                                                       lambda s: drop_one(s, "embeddings.")),
                                  r"lacks encoder weights \['embeddings\..*'\]"),
    "encoder config garbage": ("encoder", lambda d: (d / "config.json").write_text("not json"),
                               r"does not load as a Hugging Face model: .*config\.json.* not a valid JSON"),
    "raymtl.json empty object": ("raymtl.json", lambda f: f.write_text("{}"),
                                 r"lacks 'source' \(a string\), which every raymtl checkpoint has"),
    "raymtl.json without modes": ("raymtl.json", lambda f: f.write_text('{"source": "x", "pooling": "mean"}'),
                                  r"lacks 'modes' \(an object of task: 'cross', 'bi' or null\)"),
    "raymtl.json garbage": ("raymtl.json", lambda f: f.write_text("garbage"),
                            r"is not valid JSON \(Expecting value: line 1 column 1 \(char 0\)\)"),
    "raymtl.json binary": ("raymtl.json", lambda f: f.write_bytes(b"\xff\x00\xfe"), r"is not valid JSON"),
    "raymtl.json a list": ("raymtl.json", lambda f: f.write_text("[]"), r"holds list \[\], not a JSON object"),
    "raymtl.json unknown task": ("raymtl.json", lambda f: f.write_text(json.dumps(
        {**json.loads(f.read_text()), "modes": {"nli": None}})), r": 'modes' must be an object of task"),
    "raymtl.json max_length text": ("raymtl.json", lambda f: f.write_text(json.dumps(
        {**json.loads(f.read_text()), "max_length": "long"})), r": 'max_length' must be an integer, got long"),
    "raymtl.json pals unknown key": ("raymtl.json", lambda f: f.write_text(json.dumps(
        {**json.loads(f.read_text()), "pals": {"rank": 8, "size": 2}})), r": 'pals' must be null or an object of"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_names_the_file_and_what_is_wrong(damage, checkpoint, tmp_path):
    name, spoil, says = DAMAGES[damage]
    d = shutil.copytree(checkpoint, tmp_path / "ckpt")
    spoil(d / name)
    with pytest.raises(CheckpointError, match=re.escape(str(d / name)) + r"\b.*" + says):
        raymtl.load(d, device="cpu")


@pytest.mark.parametrize("what", ["no such directory", "a file", "a directory without raymtl.json"])
def test_a_path_that_is_no_checkpoint_says_so(what, checkpoint, tmp_path):
    path = {"no such directory": tmp_path / "nowhere", "a file": checkpoint / "raymtl.json",
            "a directory without raymtl.json": checkpoint / "encoder"}[what]
    reason = {"no such directory": "no such directory", "a file": "not a directory",
              "a directory without raymtl.json": r"\(no raymtl.json\)"}[what]
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))} is not a raymtl checkpoint:? {reason}"):
        raymtl.load(path, device="cpu")


def test_the_cli_prints_one_error_line(checkpoint, tmp_path, capsys):
    d = shutil.copytree(checkpoint, tmp_path / "ckpt")
    truncate(d / "heads.safetensors")
    rc = main(["predict", "--checkpoint", str(d), "--task", "sst", "--device", "cpu",
               "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "out.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"error: {d / 'heads.safetensors'} is not a readable safetensors file")
    assert not any("Traceback" in line for line in err)


def test_undamaged_checkpoints_still_load(checkpoint, tmp_path):
    assert raymtl.load(checkpoint, device="cpu").tasks == ["sst", "quora", "sts"]
    PretrainModel("tiny-random").save(tmp_path)         # a checkpoint without heads: modes {}
    assert list(MultiTaskModel.load(tmp_path, tasks=["sst", "sts"]).heads) == ["sst", "sts"]
