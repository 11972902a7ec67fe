"""``raymtl compare``: the paired bootstrap on hand-built predictions, then the command on
real checkpoints of a tiny random model and real data rows."""
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from raymtl.analysis.compare import compare, format_comparison, mean_over
from raymtl.analysis.metrics import overall, pearson
from raymtl.cli import main
from raymtl.config import smoke
from raymtl.models.encoder import tokenizer_source
from raymtl.models.multitask import MultiTaskModel


def test_the_paired_bootstrap_on_hand_built_predictions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    a = np.where(rng.random(400) < 0.5, y, (y + 1) % 5)                 # right on about half the rows
    better = np.where(a == y, y, np.where(rng.random(400) < 0.3, y, a))  # right wherever A is, and on more
    score = rng.normal(size=300) + 2.5
    labels = {"sst": y, "sts": score}
    (same_sst, same_sts) = compare({"sst": a, "sts": score + 1}, {"sst": a, "sts": score + 1}, labels)
    assert same_sst.diff == same_sst.low == same_sst.high == 0 and same_sst.b_not_better == 1.0
    assert same_sts.a == same_sts.b == pytest.approx(1.0) and same_sts.low == same_sts.high == 0
    d = compare({"sst": a}, {"sst": better}, {"sst": y}, resamples=500)[0]
    assert d.a == pytest.approx((a == y).mean()) and d.b == pytest.approx((better == y).mean())
    assert 0 < d.low < d.diff < d.high and d.b_not_better == 0.0       # B never loses a row A has
    noisy = score + rng.normal(scale=2.0, size=300)
    w = compare({"sts": noisy}, {"sts": score + rng.normal(scale=0.5, size=300)}, {"sts": score}, seed=1)[0]
    assert w.a == pytest.approx(pearson(noisy, score)) and w.low > 0 and "*" in format_comparison([w])
    # two equally good models that disagree on 40 rows (20 won, 20 lost): the interval straddles zero, no star
    other = a.copy()
    other[np.flatnonzero(a == y)[:20]] = (y[np.flatnonzero(a == y)[:20]] + 2) % 5
    other[np.flatnonzero(a != y)[:20]] = y[np.flatnonzero(a != y)[:20]]
    flip = compare({"sst": a}, {"sst": other}, {"sst": y})[0]
    assert flip.low < 0 < flip.high and "*" not in format_comparison([flip]).splitlines()[-1]
    with pytest.raises(ValueError, match="sst: 3 and 400 predictions for 400"):
        compare({"sst": a[:3]}, {"sst": a}, {"sst": y})
    with pytest.raises(ValueError, match="resamples"):
        compare({"sst": a}, {"sst": a}, {"sst": y}, resamples=10)


def test_overall_is_resampled_over_the_three_tasks_together():
    rng = np.random.default_rng(3)
    labels = {"sst": rng.integers(0, 5, 200), "quora": rng.integers(0, 2, 300), "sts": rng.normal(size=150)}
    a = {"sst": labels["sst"], "quora": 1 - labels["quora"], "sts": labels["sts"] + rng.normal(size=150)}
    b = {"sst": (labels["sst"] + 1) % 5, "quora": labels["quora"], "sts": labels["sts"]}
    diffs = {d.task: d for d in compare(a, b, labels)}
    assert list(diffs) == ["sst", "quora", "sts", "overall"]
    assert diffs["overall"].rows == 650
    assert diffs["overall"].a == pytest.approx(overall({t: diffs[t].a for t in ("sst", "quora", "sts")}))
    assert diffs["overall"].b == pytest.approx((0 + 1 + 1) / 3)
    assert diffs["sst"].high == diffs["sst"].low == -1.0 and diffs["quora"].low == 1.0


def test_the_mean_over_seeds_narrows_the_interval_of_each_seed():
    rng = np.random.default_rng(5)
    runs = []
    for seed in range(3):
        y = rng.integers(0, 2, 500)
        a = np.where(rng.random(500) < 0.8, y, 1 - y)
        b = np.where(rng.random(500) < 0.82, y, 1 - y)
        runs.append(compare({"quora": a}, {"quora": b}, {"quora": y}, seed=seed))
    (mean,) = mean_over(runs)
    assert mean.rows == 1500 and mean.diff == pytest.approx(np.mean([r[0].diff for r in runs]))
    assert mean.high - mean.low < min(r[0].high - r[0].low for r in runs) * 0.75     # about 1/sqrt(3) as wide
    with pytest.raises(ValueError, match="do not line up"):
        mean_over([runs[0], compare({"sst": y}, {"sst": y}, {"sst": y})])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, data_dir):
    """A three-task checkpoint, a second one of other weights, and single-task SST/STS ones,
    each with the data section a run writes (200 rows of each train file, split seed 1)."""
    cfg, root = smoke(), tmp_path_factory.mktemp("compare")
    tok = AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.encoder))
    out = {}
    for name, tasks, seed in (("multi", ["sst", "quora", "sts"], 0), ("other", ["sst", "quora", "sts"], 1),
                              ("sst", ["sst"], 2), ("sts", ["sts"], 3)):
        torch.manual_seed(seed)
        model = MultiTaskModel.from_config(cfg.model, tasks)
        model.save(root / name, tok, extra={"max_length": 32})
        (root / name / "config.json").write_text(json.dumps({"data": {"data_dir": data_dir, "max_rows": 200,
                                                                      "split_seed": 1}}))
        out[name] = str(root / name)
    return out


def test_compare_scores_both_sides_on_the_same_validation_rows(checkpoints, capsys):
    ck = checkpoints
    assert main(["compare", "--a", ck["multi"], "--b", ck["multi"], "--device", "cpu", "--resamples", "200"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| sst", "| quora", "| sts", "| overall"]
    assert all("+0.0000 | [+0.0000, +0.0000] | 100.0%" in line for line in table[2:])
    # one side of two single-task checkpoints: only the tasks both sides have are compared
    assert main(["compare", "--a", ck["multi"], "--b", ck["sst"], ck["sts"], "--name-a", "joint",
                 "--name-b", "singles", "--device", "cpu"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "| joint | singles |" in table[0] and [line.split(" | ")[0] for line in table[2:]] == ["| sst", "| sts"]
    assert " 20 |" in table[2]                                         # 10 % of 200 rows
    # two pairs (as two seeds would be): each pair's table, then their mean; A/B swapped cancels
    assert main(["compare", "--a", ck["multi"], "--b", ck["other"], "--a", ck["other"], "--b", ck["multi"],
                 "--device", "cpu", "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "pair 2: --a " in out and out.count("| sst |") == 3
    mean = out.split("mean over the 2 pairs:")[1].splitlines()[3:]
    assert [row.split(" | ")[:2] for row in mean] == [["| sst", "40"], ["| quora", "40"], ["| sts", "40"], ["| overall", "120"]]
    assert all(row.split(" | ")[4].startswith(("+0.0000", "-0.0000")) for row in mean)


def test_compare_refuses_what_it_cannot_pair(checkpoints, tmp_path, data_dir, capsys):
    ck = checkpoints
    assert main(["compare", "--a", ck["sst"], ck["multi"], "--b", ck["other"], "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--a:" in err and "both have a head for sst" in err
    assert main(["compare", "--a", ck["sst"], "--b", ck["sts"], "--device", "cpu"]) == 2
    assert "no task in common: --a has ['sst'], --b has ['sts']" in capsys.readouterr().err
    assert main(["compare", "--a", ck["multi"], "--b", ck["sst"], "--sts", f"{data_dir}/sts/train.csv",
                 "--device", "cpu"]) == 2
    assert "--b has no head for sts (it has ['sst'])" in capsys.readouterr().err
    assert main(["compare", "--a", ck["multi"], "--b", ck["other"], "--a", ck["sst"], "--device", "cpu"]) == 2
    assert "2 --a against 1 --b: give them in pairs" in capsys.readouterr().err
    moved = tmp_path / "other-split"
    shutil.copytree(ck["other"], moved)
    (moved / "config.json").write_text(json.dumps({"data": {"data_dir": data_dir, "max_rows": 200, "split_seed": 7}}))
    assert main(["compare", "--a", ck["multi"], "--b", str(moved), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "sst:" in err and "different rows" in err and "'split_seed': (1, 7)" in err and "--sst FILE" in err
