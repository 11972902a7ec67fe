"""File layouts in and out: minBERT and GLUE task files for every task, the minBERT prediction
file (``raymtl predict --format minbert``), and ``overall`` only over all three tasks."""
import csv

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import raymtl
from raymtl.analysis.metrics import overall
from raymtl.cli import main
from raymtl.config import smoke
from raymtl.data.readers import DataError, read_task_file
from raymtl.models.encoder import tokenizer_source
from raymtl.models.multitask import MultiTaskModel
from raymtl.tasks import TASKS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = smoke()
    torch.manual_seed(0)
    model = MultiTaskModel.from_config(cfg.model, ["sst", "quora", "sts"])
    d = tmp_path_factory.mktemp("ckpt")
    model.save(d, AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.encoder)), extra={"max_length": 32})
    return d


def real_rows(path: str, n: int, skip: int = 0) -> tuple[list[str], list[list[str]]]:
    """Header and ``n`` TAB-split rows of a real data file, after ``skip`` rows."""
    lines = open(path, encoding="utf-8").read().split("\n")
    return lines[0].split("\t"), [x.split("\t") for x in lines[1 + skip:1 + skip + n]]


def minbert_quora(data_dir: str, path, n: int = 200, labels: bool = True) -> list[list[str]]:
    """Real QQP rows (after the malformed line 2) rewritten in minBERT's Quora layout:
    ``<blank> id sentence1 sentence2 [is_duplicate]`` with a row index first."""
    _, rows = real_rows(f"{data_dir}/quora/train.tsv", n, skip=1)
    out = [[str(i), r[0], r[3], r[4]] + ([r[5]] if labels else []) for i, r in enumerate(rows)]
    header = ["", "id", "sentence1", "sentence2"] + (["is_duplicate"] if labels else [])
    path.write_text("\n".join("\t".join(r) for r in [header, *out]) + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------- reading both layouts
def test_quora_reads_in_the_minbert_layout_as_in_the_glue_one(data_dir, tmp_path):
    minbert = minbert_quora(data_dir, tmp_path / "quora-train.csv")
    glue, _ = read_task_file(TASKS["quora"], f"{data_dir}/quora/train.tsv", max_rows=201)   # line 2 is bad
    got, rep = read_task_file(TASKS["quora"], str(tmp_path / "quora-train.csv"))
    assert len(got) == 200 and not rep.bad
    key = ("id", "text_a", "text_b", "label")
    assert [tuple(r[k] for k in key) for r in got] == [tuple(r[k] for k in key) for r in glue]
    assert [r["id"] for r in got] == [r[1] for r in minbert]            # the id column, not the row index
    minbert_quora(data_dir, tmp_path / "quora-test-student.csv", n=5, labels=False)
    test, _ = read_task_file(TASKS["quora"], str(tmp_path / "quora-test-student.csv"), with_labels=False)
    assert [r["text_b"] for r in test] == [r["text_b"] for r in glue[:5]]


def test_sts_and_sst_read_in_the_glue_layout_as_in_the_minbert_one(data_dir, tmp_path):
    _, rows = real_rows(f"{data_dir}/sts/train.csv", 50)            # <blank> id sentence1 sentence2 similarity
    glue = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
    glue += [f"{r[1]}\tmain-news\tx\t2012\t{r[0]}\tnone\tnone\t{r[2]}\t{r[3]}\t{r[4]}" for r in rows]
    (tmp_path / "sts-b.tsv").write_text("\n".join(glue) + "\n", encoding="utf-8")
    got, _ = read_task_file(TASKS["sts"], str(tmp_path / "sts-b.tsv"))
    want, _ = read_task_file(TASKS["sts"], f"{data_dir}/sts/train.csv", max_rows=50)
    key = ("id", "text_a", "text_b", "label")
    assert [tuple(r[k] for k in key) for r in got] == [tuple(r[k] for k in key) for r in want]
    _, rows = real_rows(f"{data_dir}/sst/test-unlabeled.csv", 20)     # GLUE SST-2 test layout: index sentence
    (tmp_path / "sst-test.tsv").write_text("index\tsentence\n" + "".join(f"{i}\t{r[3]}\n" for i, r in enumerate(rows)))
    got, _ = read_task_file(TASKS["sst"], str(tmp_path / "sst-test.tsv"), with_labels=False)
    assert [r["id"] for r in got] == [str(i) for i in range(20)] and got[3]["text_a"] == rows[3][3].strip()


def test_bad_rows_in_the_minbert_layout_still_name_file_and_line(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("\tid\tsentence1\tsentence2\tis_duplicate\n0\ta1\tHow?\tWhy?\t1\n"
                    "1\ta2\tWhat is it?\tWhat is that? 0\n2\ta3\tWho?\tWhom?\t0\n")   # line 3: a space, not a TAB
    rows, rep = read_task_file(TASKS["quora"], str(path), max_bad_fraction=0.5)
    assert [r["id"] for r in rows] == ["a1", "a3"] and rep.bad == [(3, "expected 5 TAB-separated fields, got 4")]
    with pytest.raises(DataError, match=r"(?s)q\.csv: 1 of 3 rows are malformed.*q\.csv:3: expected 5"):
        read_task_file(TASKS["quora"], str(path))
    path.write_text("\tid\tsentence1\tquestion\tis_duplicate\n0\ta1\tHow?\tWhy?\t1\n")
    with pytest.raises(DataError, match=r"q\.csv:1: missing required column\(s\) \['question2 or sentence2'\]"):
        read_task_file(TASKS["quora"], str(path))


# ---------------------------------------------------------------- the CLI on both layouts, and its outputs
def test_predict_and_evaluate_take_the_minbert_quora_layout(checkpoint, data_dir, tmp_path, capsys):
    rows = minbert_quora(data_dir, tmp_path / "quora-dev.csv", n=60)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--device", "cpu",
                 "--quora", str(tmp_path / "quora-dev.csv")]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("Quora accuracy  ")
    out = tmp_path / "pred.csv"
    assert main(["predict", "--checkpoint", str(checkpoint), "--task", "quora", "--device", "cpu",
                 "--input", str(tmp_path / "quora-dev.csv"), "--output", str(out)]) == 0
    got = list(csv.DictReader(open(out)))
    api = raymtl.load(checkpoint, device="cpu").predict("quora", [(r[2].strip(), r[3].strip()) for r in rows])
    assert [r["id"] for r in got] == [r[1] for r in rows]
    assert [int(r["prediction"]) for r in got] == list(api)


@pytest.mark.parametrize("task,column", [("sst", "Predicted_Sentiment"), ("sts", "Predicted_Similiary")])
def test_predict_writes_the_minbert_prediction_file(checkpoint, data_dir, tmp_path, task, column):
    src = f"{data_dir}/{task}/test-unlabeled.csv"
    out = tmp_path / f"{task}-test-output.csv"
    assert main(["predict", "--checkpoint", str(checkpoint), "--task", task, "--device", "cpu",
                 "--input", src, "--output", str(out), "--format", "minbert"]) == 0
    rows, _ = read_task_file(TASKS[task], src, with_labels=False, max_bad_fraction=0.0, allow_empty_text=True)
    api = raymtl.load(checkpoint, device="cpu").predict_rows(task, rows)
    values = [str(int(p)) for p in api] if task == "sst" else [f"{p:.4f}" for p in api]
    lines = out.read_text().split("\n")
    assert lines[0] == f"id \t {column} " and lines[-1] == ""
    assert lines[1:-1] == [f"{r['id']} , {v} " for r, v in zip(rows, values)]
    assert len(lines) == 2 + {"sst": 2210, "sts": 1725}[task]


def test_minbert_format_for_quora_and_the_default_stays_csv(checkpoint, data_dir, tmp_path):
    rows = minbert_quora(data_dir, tmp_path / "quora-test-student.csv", n=30, labels=False)
    for fmt in ("minbert", "csv"):
        assert main(["predict", "--checkpoint", str(checkpoint), "--task", "quora", "--device", "cpu",
                     "--input", str(tmp_path / "quora-test-student.csv"), "--output", str(tmp_path / fmt)]
                    + (["--format", fmt] if fmt == "minbert" else [])) == 0
    minbert = (tmp_path / "minbert").read_text().splitlines()
    default = list(csv.reader(open(tmp_path / "csv")))
    assert minbert[0] == "id \t Predicted_Is_Paraphrase " and default[0] == ["id", "prediction"]
    assert minbert[1:] == [f"{i} , {p} " for i, p in default[1:]] and [i for i, _ in default[1:]] == [
        r[1] for r in rows]


def test_overall_only_when_sst_quora_and_sts_are_all_scored(checkpoint, data_dir, tmp_path, capsys):
    files = {}
    for task, src, skip in (("sst", "sst/train.csv", 0), ("quora", "quora/train.tsv", 1), ("sts", "sts/train.csv", 0)):
        header, rows = real_rows(f"{data_dir}/{src}", 80, skip)
        files[task] = tmp_path / f"{task}.tsv"
        files[task].write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    base = ["evaluate", "--checkpoint", str(checkpoint), "--device", "cpu"]
    assert main(base + ["--sts", str(files["sts"])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("STS Pearson  ")
    assert main(base + ["--sst", str(files["sst"]), "--sts", str(files["sts"])]) == 0
    assert [x.split("  ")[0] for x in capsys.readouterr().out.splitlines()] == ["SST accuracy", "STS Pearson"]
    assert main(base + [f"--{t}={p}" for t, p in files.items()]) == 0
    out = capsys.readouterr().out.splitlines()
    names = ["SST accuracy", "Quora accuracy", "STS Pearson", "overall"]
    assert [x.rsplit(" ", 1)[0].strip() for x in out] == names
    scores = {t: float(x.rsplit(" ", 1)[1]) for t, x in zip(("sst", "quora", "sts"), out)}
    assert float(out[3].rsplit(" ", 1)[1]) == pytest.approx(overall(scores), abs=2e-4)
    m = raymtl.load(checkpoint, device="cpu")
    sts_rows, _ = read_task_file(TASKS["sts"], str(files["sts"]))
    assert list(m.evaluate({"sts": sts_rows})) == ["sts"]               # the API's scores follow the same rule
    assert np.isfinite(m.evaluate({"sts": sts_rows})["sts"])


# ---------------------------------------------------------------- related sets, out of domain
def test_related_sets_are_scored_out_of_domain_by_their_target_heads(checkpoint, data_dir, tmp_path, capsys):
    from raymtl.analysis.evaluation import related_score, row_batches
    from raymtl.data.related import get_related, read_related
    m = raymtl.load(checkpoint, device="cpu")
    # binary sentiment from SST's five classes: the mass on {0, 1} against {3, 4}, by hand
    rows = read_related("cfimdb", data_dir)[0][:60]
    with torch.no_grad():
        probs = torch.cat([m.model("sst", b).softmax(-1) for b in row_batches(m.model, m.tokenizer, "sst", rows, 32)])
    positive = (probs[:, 3] + probs[:, 4] > probs[:, 0] + probs[:, 1]).numpy()
    truth = np.array([r["label_set"] == 0b11000 for r in rows])                  # {3, 4}: a positive review
    assert truth.any() and not truth.all()
    assert related_score(m.model, m.tokenizer, get_related("cfimdb"), rows, 32) == pytest.approx((positive == truth).mean())
    # a 0/1 paraphrase set is the Quora head's own prediction; a score set is the STS head's Pearson
    rows = read_related("mrpc", data_dir)[0][:80]
    assert related_score(m.model, m.tokenizer, get_related("mrpc"), rows, 32) == pytest.approx(
        (m.predict_rows("quora", rows) == np.array([r["label"] for r in rows])).mean())
    rows = read_related("sick", data_dir)[0][:80]
    pred = m.predict_rows("sts", rows)
    assert related_score(m.model, m.tokenizer, get_related("sick"), rows, 32) == pytest.approx(
        np.corrcoef(pred, [r["label"] for r in rows])[0, 1], abs=1e-6)

    # the command: a table row per set, every row of the set scored
    base = ["evaluate", "--checkpoint", str(checkpoint), "--device", "cpu", "--data-dir", data_dir]
    assert main(base + ["--related", "sick,mrpc"]) == 0
    table = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| sick")
             or line.startswith("| mrpc")]
    assert [(r[0], r[1], r[2], r[3]) for r in table] == [("| sick", "sts", "Pearson", "5,000"),
                                                         ("| mrpc", "quora", "accuracy", "4,076")]
    assert -1 <= float(table[0][4]) <= 1 and 0 <= float(table[1][4]) <= 1
    # bad input: an unknown set, a head the checkpoint lacks, a missing file; nothing is scored
    assert main(base + ["--related", "sick", "--sts", "dev.csv"]) == 2
    assert "error: --related: scores related sets only; run --sts in an evaluate of its own" in capsys.readouterr().err
    assert main(base + ["--related", "sick,nosuch"]) == 2
    assert "unknown related data set 'nosuch'; valid: ['cfimdb', 'mr', 'mrpc', 'sick', 'sst2']" in capsys.readouterr().err
    sst_only = tmp_path / "sst-only"
    m.model.__class__.load(checkpoint, tasks=["sst"]).save(sst_only, m.tokenizer, extra={"max_length": 32})
    assert main(["evaluate", "--checkpoint", str(sst_only), "--device", "cpu", "--related", "cfimdb,sick"]) == 2
    assert "has no head for ['sts'] (needed by --related sick)" in capsys.readouterr().err
    assert main(base[:-1] + [str(tmp_path / "nodata"), "--related", "sick,mrpc"]) == 2
    got = capsys.readouterr()
    assert f"error: --related sick: cannot read data file {tmp_path}/nodata/sick/SICK_train.txt" in got.err
    assert got.out == ""                                                  # no table begun
