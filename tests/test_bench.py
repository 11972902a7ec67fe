"""Every benchmark script's --smoke mode runs end to end (so the scripts never rot) and
prints its table. Real runs: the session's Ray cluster, real data, the tiny model."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from raymtl.config import smoke
from raymtl.recipes import PLAIN_ENCODER
from raymtl.train.trainer import fit_once

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)


def bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fusion_overhead_smoke(capsys):
    bench("fusion").main(["--smoke"])
    out = capsys.readouterr().out
    assert "vs plain sum" in out and "pcgrad" in out and "upgrad" in out


def test_grad_norms_smoke(capsys):
    bench("grad_norms").main(["--smoke", "--batches", "2"])
    out = capsys.readouterr().out
    norms = [line for line in out.splitlines() if re.match(r"\| (sst|quora|sts) \|", line)]
    assert len(norms) == 3 and all(float(line.split("|")[3].split(",")[0]) > 0 for line in norms)
    imtl = next(line for line in out.splitlines() if line.startswith("| imtl_g |"))
    cos = [float(c) for c in imtl.strip("| \n").split("|")[2:]]
    assert max(cos) - min(cos) < 1e-3        # IMTL-G: equal cosine to every task gradient


def test_speed_smoke(ray_cluster, capsys):
    speed = bench("speed")
    measured = speed.RESULTS.stat().st_mtime_ns if speed.RESULTS.is_file() else None
    loops = ["plain-padded", "plain-bucketed-bf16-autocast", "raymtl-default", "raymtl-default-bf16"]
    speed.main(["--smoke", "--loops", ",".join(loops)])      # a plain and a Ray loop per precision: the suite's time
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| loop ")}
    assert set(rows) == set(loops)                            # every chosen loop ran (or says why it failed)
    for name, cells in rows.items():
        assert cells[0] == speed.LOOPS[name]                  # the precision column
        assert float(cells[3]) > 0, (name, cells)             # useful tokens/s
    assert rows["raymtl-default"][4] == "1.00"                # the ratio column: against the fp32 default loop
    assert "other processes' CPU while it trained" in out and "Issue 27 target" in out
    written = Path(re.search(r"\[bench\] wrote (.+)", out).group(1))
    assert written != speed.RESULTS and "| raymtl-default-bf16 | bf16 DeepSpeed |" in written.read_text()
    assert (speed.RESULTS.stat().st_mtime_ns if speed.RESULTS.is_file() else None) == measured   # untouched


def test_speed_unknown_loop_fails_before_ray(capsys):
    with pytest.raises(SystemExit):
        bench("speed").main(["--smoke", "--loops", "raymtl,nosuch"])
    assert "unknown loop(s) ['nosuch']" in capsys.readouterr().err


def test_speed_profile_smoke(capsys):
    bench("speed").main(["--smoke", "--profile", "--profile-top", "5"])    # in-process, no Ray
    out = capsys.readouterr().out
    assert "| phase | fp32 | bf16 autocast | bf16 ÷ fp32 |" in out and "| matmul |" in out
    assert out.count("Top 5 ops by self CPU time") == 2


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_speed_cpu_sampler_charges_the_other_processes_not_the_trainer():
    speed = bench("speed")
    spin = "import time\nt = time.time()\nwhile time.time() - t < 2.5: pass"
    busy = subprocess.Popen(["raymtl-busy-child", "-c", spin], executable=sys.executable)
    with speed.CpuSampler(period=0.25) as sampler:
        busy.wait(timeout=60)
    found = sampler.others(lambda pid, name: name == "raymtl-busy-child", busy=0.5)
    assert found is not None and found["seconds"] > 0.5           # the child was seen training, by name
    assert 0 <= found["machine"] <= 1
    assert "raymtl-busy-child" not in found["by_name"]             # the trainer is not charged as "other"
    assert sampler.others(lambda pid, name: False, busy=0.5) is None   # no trainer: no interval qualifies
    assert speed.process_name(["ray::RayTrainWorker.train_fn", "x"]) == "ray::RayTrainWorker.train_fn"
    assert speed.process_name(["/v/bin/python", "-u", "/v/ray/dashboard/dashboard.py"]) == "python dashboard.py"
    assert speed.process_name(["ray-dashboard-StateHead-0 (/v/bin/python -c 'x')"]) == "ray-dashboard-StateHead-0"
    assert speed.process_name([], "kdamond.0") == "kdamond.0"


def test_engine_smoke():
    # a subprocess: DeepSpeed's 1-process gloo group must not leak into the pytest process
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "engine.py"), "--smoke", "--port", "29573"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert {"plain", "plain-fused", "engine", "engine-module"} <= set(rows)
    assert float(rows["engine"].split("|")[2]) > 0                  # a measured step time


def test_memory_smoke_measures_what_zero2_saves_per_worker(tmp_path):
    # a subprocess: the bench starts its own 2 workers (one gloo group, no Ray) per stage
    results = tmp_path / "results" / "memory.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--smoke", "--port", "29583",
                           "--results", str(results)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if re.match(r"\| [0-3] \|", line)]
    cells = {int(row[0]): row for row in (line.strip("| ").split(" | ") for line in table)}
    assert sorted(cells) == [0, 2]

    def mb(cell: str) -> float:
        return float(cell.split()[0].replace(",", ""))
    for stage in (0, 2):
        assert mb(cells[stage][1]) > 0                              # a measured peak RSS
        adam, adam_theory = cells[stage][7].split(" / ")            # AdamW state: measured / theory
        assert mb(adam) == pytest.approx(mb(adam_theory), rel=0.05)
    assert mb(cells[2][7]) == pytest.approx(mb(cells[0][7]) / 2, rel=0.05)   # each worker holds half
    assert mb(cells[2][3]) < mb(cells[0][3]) and mb(cells[2][4]) > 0         # measured: ZeRO-2 holds less
    written = results.read_text()                                   # the table, the command, the machine
    assert "`.venv/bin/python bench/memory.py --smoke --port 29583 --results " in written
    assert "Machine: " in written and all(line in written for line in table)


def test_fusion_quality_smoke_reuses_finished_runs(ray_cluster, tmp_path, capsys):
    fq = bench("fusion_quality")
    fq.main(["--smoke", "--methods", "sum,pcgrad", "--output", str(tmp_path)])
    first = capsys.readouterr().out
    assert "pcgrad" in first and (tmp_path / "fusion-pcgrad" / "best_metrics.json").is_file()
    fq.main(["--smoke", "--methods", "sum,pcgrad", "--output", str(tmp_path)])   # read back, no training
    assert capsys.readouterr().out.splitlines()[-2:] == first.splitlines()[-2:]
    cfg = smoke().replace(output=str(tmp_path), name="fusion-pcgrad", fusion="pcgrad", fusion_every=1,
                          **PLAIN_ENCODER)
    assert fit_once(cfg)["val_sst"] == json.loads((tmp_path / "fusion-pcgrad" / "best_metrics.json")
                                                  .read_text())["val_sst"]
    with pytest.raises(ValueError, match=r"fusion-pcgrad finished with another config \(lr: saved 0\.001, "
                                         r"asked 0\.002\): remove that run"):
        fit_once(cfg.replace(lr=2e-3))                  # a changed config is never read back as this run


def test_quality_smoke_single_vs_multi_task(ray_cluster, tmp_path, capsys):
    # --best '': no fusion setups, the preset is the multi-task row (the default's method, longer),
    # so the smoke trains each kind of row once; --single-presets adds the same-compute single-task models
    bench("quality").main(["--smoke", "--seeds", "1", "--best", "", "--presets", "hour", "--single-presets", "hour",
                           "--output", str(tmp_path)])
    tables, rows = [], []
    for line in [*capsys.readouterr().out.splitlines(), ""]:     # the tables' rows, without the |---| lines
        if line.startswith("|---"):
            continue
        if line.startswith("| "):
            rows.append(line.split("|")[1:-1])
        elif rows:
            tables, rows = tables + [rows], []
    means, gaps, per_seed = tables                              # header row first in each
    setups = [row[0].strip() for row in means[1:]]
    assert setups == ["single-task (3 models)", "single-task models merged (task_arithmetic)",
                      "single-task models merged (ties)", "multi-task, --preset hour",
                      "single-task (3 models), --preset hour's budget"]
    assert [row[0].strip() for row in gaps[1:]] == setups[1:] and all(row[-1].strip().endswith("of 1") for row in gaps[1:])
    for row in gaps[1:]:                                        # the mean gap and its bootstrap interval
        for cell in row[2:6]:
            gap, low, high = map(float, re.fullmatch(r" ([+-][\d.]+)(?: \*)? \[([+-][\d.]+), ([+-][\d.]+)\] ", cell).groups())
            assert low <= high and abs(gap) <= 1
    against = {row[0].strip(): row[1].strip() for row in gaps[1:]}    # the hour against its own budget's models
    assert against == {**{s: "single-task (3 models)" for s in setups[1:]}, "multi-task, --preset hour": setups[-1]}
    assert [(row[0].strip(), row[1].strip()) for row in per_seed[1:]] == [("1", s) for s in setups]
    assert not list(tmp_path.glob("mtl-*"))                     # no setup run trained
    merged = json.loads((tmp_path / "merged-ties-s1" / "merge.json").read_text())
    assert merged["method"] == "ties" and sorted(merged["checkpoints"]) == ["quora", "sst", "sts"]

    def meta_of(run):
        best = json.loads((tmp_path / run / "best_metrics.json").read_text())["best_checkpoint"]
        return json.loads((Path(best) / "raymtl.json").read_text())
    hour = json.loads((tmp_path / "preset-hour-s1" / "best_metrics.json").read_text())["config"]
    assert hour["scale"]["precision"] == "auto" and hour["train"]["early_stop"] == 4   # the preset, shrunk
    assert hour["train"]["keep_task_best"]
    assert (hour["train"]["seed"], hour["data"]["split_seed"]) == (1, 1)                # ... on the bench's seed
    best = meta_of("preset-hour-s1")                                     # the default's addons reached the model
    assert best["pals"]["tasks"] == ["sts"] and best["task_layers"] == {"sst": 1}
    for t in ("sst", "quora", "sts"):                     # one plain single-task run per task, same budget
        assert meta_of(f"single-{t}-s1")["pals"] is None and meta_of(f"single-{t}-s1")["task_layers"] == {}
        on_hour = json.loads((tmp_path / f"single-{t}-hour-s1" / "best_metrics.json").read_text())["config"]
        assert on_hour["data"]["tasks"] == [t] and on_hour["train"]["early_stop"] == hour["train"]["early_stop"]
        assert on_hour["train"]["steps"] == hour["train"]["steps"] and on_hour["train"]["fusion"] == "sum"
        assert not on_hour["train"]["keep_task_best"]
        assert meta_of(f"single-{t}-hour-s1")["pals"] is None and (on_hour["data"]["split_seed"], on_hour["train"]["seed"]) == (1, 1)


def test_sampling_smoke_gives_every_sampler_the_same_batches_and_smoothness_reads_its_default_back(
        ray_cluster, tmp_path, capsys):
    # (--single-task adds the single-task models of recipes.single_task, trained in the quality smoke above)
    bench("sampling").main(["--smoke", "--samplers", "round_robin,proportional", "--output", str(tmp_path)])
    table = [row.split("|")[1:-1] for row in capsys.readouterr().out.splitlines() if row.startswith("| ")][1:]
    assert [(r[0].strip(), int(r[1])) for r in table] == [("round_robin", 12), ("proportional", 36)]
    assert sum(int(n) for n in table[1][2].split("/")) == 36            # 3 x 12 batches, drawn per step
    assert json.loads((tmp_path / "proportional-s42" / "best_metrics.json").read_text())["config"]["train"][
        "sampling"] == "proportional"
    default = (tmp_path / "round_robin-s42" / "best_metrics.json").read_text()
    bench("smoothness").main(["--smoke", "--output", str(tmp_path)])   # SAM, SMART on fewer steps, the default read back
    table = [row.split("|")[1:-1] for row in capsys.readouterr().out.splitlines() if row.startswith("| ")][1:]
    assert [(r[0].strip(), int(r[1])) for r in table] == [("default", 12), ("SAM rho 0.05", 6), ("SMART weight 1", 3)]
    assert (tmp_path / "round_robin-s42" / "best_metrics.json").read_text() == default     # not retrained
    sam = json.loads((tmp_path / "sam0.05-6steps-s42" / "best_metrics.json").read_text())
    assert sam["config"]["train"]["sam_rho"] == 0.05 and sam["sam_grad_norm"] > 0
    smart = json.loads((tmp_path / "smart1-3steps-s42" / "best_metrics.json").read_text())
    assert smart["config"]["train"]["smart_weight"] == 1 and smart["config"]["train"]["sam_rho"] == 0
    assert smart["smart_term"] > 0 and "smart_term" not in sam             # the regulariser acted
    assert all(0 <= smart[f"val_{t}"] <= 1 for t in ("sst", "quora")) and -1 <= smart["val_sts"] <= 1


def test_cross_bi_smoke_distils_a_cross_teacher_into_the_bi_student(ray_cluster, tmp_path, capsys):
    bench("cross_bi").main(["--smoke", "--tasks", "quora", "--output", str(tmp_path)])
    rows = [row.split("|")[1:-1] for row in capsys.readouterr().out.splitlines() if row.startswith("| quora ")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0]]
    assert cells[:4] == ["quora", "12", "12", "accuracy"] and all(0 <= float(c) <= 1 for c in cells[4:7])

    def config(run):
        return json.loads((tmp_path / run / "best_metrics.json").read_text())["config"]
    assert config("cross-quora-s42")["model"]["pair_mode"]["quora"] == "cross"
    student = config("bi-quora-from-cross-s42")
    assert student["model"]["pair_mode"]["quora"] == "bi" and student["data"]["tasks"] == ["quora"]
    assert student["distill"]["teacher_outputs"] == {"quora": str(tmp_path / "cross-quora-s42" / "outputs")}
    assert config("bi-quora-s42")["distill"]["teacher_outputs"] == {}
    with pytest.raises(SystemExit):                                 # before any Ray or training
        bench("cross_bi").main(["--smoke", "--tasks", "sst", "--output", str(tmp_path)])
    assert "--tasks 'sst': choose from ['quora', 'sts']" in capsys.readouterr().err


def test_pretrain_smoke_warms_the_head_pretrains_and_fine_tunes_from_the_stage(ray_cluster, tmp_path, capsys):
    bench("pretrain").main(["--smoke", "--choices", "mlm-sup", "--output", str(tmp_path)])
    rows = [row.split("|")[1:-1] for row in capsys.readouterr().out.splitlines() if row.startswith("| mlm-sup ")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0]]
    assert cells[1] == "12" and re.fullmatch(r"-?[01]\.\d{4} -> -?[01]\.\d{4}", cells[3]) and cells[-2] == "-"
    assert all(0 <= float(c) <= 1 for c in cells[5:7]) and -1 <= float(cells[7]) <= 1

    def record(run):
        return json.loads((tmp_path / run / "best_metrics.json").read_text())
    warm, pre = record("pretrain-mlm-sup-12steps-s1-head"), record("pretrain-mlm-sup-12steps-s1")
    assert warm["step"] == 4 and warm["config"]["pretrain"]["train_only_head"]
    assert pre["config"]["pretrain"]["head_warmup_steps"] == 4 and pre["config"]["pretrain"]["simcse_unsup_weight"] == 0
    assert pre["mlm_loss_step0"] == pytest.approx(warm["mlm_loss"], abs=1e-4)        # it started from the warm head
    assert record("mtl-from-mlm-sup-12steps-s1")["config"]["model"]["init_from"] == pre["best_checkpoint"]
    with pytest.raises(SystemExit):                                 # before any Ray or training
        bench("pretrain").main(["--smoke", "--choices", "mlm", "--output", str(tmp_path)])
    assert "--choices 'mlm': choose from" in capsys.readouterr().err


def test_quality_setups_parse_and_bad_ones_fail_before_training(capsys):
    quality = bench("quality")
    assert quality.parse_setup("sum") == ("sum", "sum", {"fusion": "sum", "fusion_every": 1, "pals": False,
                                                         "task_layers": {}})
    assert quality.parse_setup("imtl_g:10+pals+prefix") == (
        "imtl_g-every10-pals-prefix", "imtl_g, fused every 10 steps, PALs, learned task prefix",
        {"fusion": "imtl_g", "fusion_every": 10, "pals": True, "pal_tasks": (), "task_layers": {},
         "task_prefix": "learned"})
    assert quality.parse_setup("imtl_g:10+pals=sst/sts+layers=sst") == (
        "imtl_g-every10-pals-sst-sts-layers-sst",
        "imtl_g, fused every 10 steps, PALs (sst/sts only), own top half (sst only)",
        {"fusion": "imtl_g", "fusion_every": 10, "pals": True, "pal_tasks": ("sst", "sts"),
         "task_layers": {"sst": "half"}})
    assert quality.parse_setup("sum+layers")[2]["task_layers"] == {"sst": "half", "quora": "half", "sts": "half"}
    for bad, says in (("imtl_g:x", "must be an integer"), ("imtl_g+lora", "unknown addon(s) ['lora']"),
                      ("imtl_g+prefix=sts", "+prefix takes no =TASKS (only +pals, +layers do)"),
                      ("imtl_g+layers=nli", "task_layers task='nli' is not valid"),
                      ("imtl_g+pals=stss", "pal_tasks='stss' is not valid"),
                      ("nosuch:10", "fusion='nosuch' is not valid")):
        with pytest.raises(SystemExit):     # argparse's error exit, no Ray started, nothing trained
            quality.main(["--smoke", "--seeds", "1", "--best", bad, "--output", "/nonexistent/never-written"])
        assert says in capsys.readouterr().err
    for bad, says in (("single-sst", "--presets single-sst: trains ['sst'], not the three tasks"),
                      ("hour,nosuch", "preset 'nosuch': valid are mtl, hour")):
        with pytest.raises(SystemExit):
            quality.main(["--smoke", "--seeds", "1", "--presets", bad, "--output", "/nonexistent/never-written"])
        assert says in capsys.readouterr().err
    for flag, bad, says in (("--single-presets", "nosuch", "preset 'nosuch': valid are mtl, hour"),
                            ("--report", "../README", "--report '../README': a file name")):
        with pytest.raises(SystemExit):
            quality.main(["--smoke", "--seeds", "1", flag, bad, "--output", "/nonexistent/never-written"])
        assert says in capsys.readouterr().err


def test_transfer_smoke_table_next_to_the_heuristic(ray_cluster, tmp_path, capsys):
    bench("transfer").main(["--smoke", "--targets", "sts", "--supports", "quora", "--output", str(tmp_path)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| sts ")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[1] == "quora" and cells[3] in ("pairwise", "stilts")      # the heuristic's prediction
    assert all(-1 <= float(c) <= 1 for c in cells[4:7])                    # pairwise, stilts, mtl_all
    assert cells[7] in ("pairwise", "stilts", "tie") and cells[8] in ("yes", "no", "-")
    for run in ("pairwise-quora-sts", "stilts-quora", "stilts-quora-sts", "mtl_all"):   # 4 runs, same budget
        assert (tmp_path / run / "stage.json").is_file()
    # the STILTs chain through Ray Train: the target run starts from the support run's checkpoint
    support, target = (json.loads((tmp_path / run / "stage.json").read_text())["result"]["checkpoint"]
                       for run in ("stilts-quora", "stilts-quora-sts"))
    first, used = (json.loads(Path(c, "config.json").read_text()) for c in (support, target))
    assert first["data"]["tasks"] == ["quora"] and first["model"]["init_from"] == ""
    assert used["data"]["tasks"] == ["sts"] and used["model"]["init_from"] == support
    assert list(json.loads(Path(target, "raymtl.json").read_text())["modes"]) == ["sts"]   # no support head


def test_data_bench_smoke(ray_cluster, tmp_path):
    # a subprocess: the bench measures each corpus size in a fresh driver process (its peak RSS
    # is that size's) and trains in another; they join the session's Ray (never a second one)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "data.py"), "--smoke", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    rows = {cells[0]: cells for cells in (line.strip("| ").split(" | ") for line in proc.stdout.splitlines()
                                          if re.match(r"\| [\d.]+ MB \|", line))}
    assert sorted(rows) == ["0.5 MB", "2 MB"]                     # a row per corpus size
    for cells in rows.values():
        assert int(cells[2].replace(",", "")) > 0                   # rows written
        assert float(cells[4].replace(",", "")) > 0 and float(cells[5]) > 0     # rows/s, MB/s
    runs = [line.split("|")[1:-1] for line in proc.stdout.splitlines()
            if line.startswith(("| multi-task", "| pre-training"))]
    assert [(r[0].split(",")[0].strip(), r[1].strip().split()[0]) for r in runs] == [
        ("multi-task", "streamed"), ("multi-task", "in"), ("pre-training", "streamed")]
    assert all(float(r[3]) > 0 and r[5].strip().endswith("%") for r in runs)   # s/step, data wait
    halves = [float(x) for x in runs[0][4].split(",")]                  # the multi-task run's two windows
    assert len(halves) == 2 and min(halves) > 0 and runs[2][4].strip() == ""
    assert "joined a Ray instance already running" in proc.stdout       # the session's: never a second Ray
    assert "Targets of issue 28:" in proc.stdout and "written to" not in proc.stdout   # --smoke writes nothing
    assert sorted(p.name for p in (tmp_path / "corpora").glob("*.txt")) == ["wikitext2-x-0.5MB-seed0.txt",
                                                                           "wikitext2-x-2MB-seed0.txt"]


def test_average_bench_writes_the_mean_of_one_runs_checkpoints_and_scores_it(tmp_path, data_dir, capsys):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from raymtl.models.encoder import tokenizer_source
    from raymtl.models.multitask import MultiTaskModel
    cfg = smoke().replace(data_dir=data_dir, max_rows=200)
    tok = AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.encoder))
    dirs = []
    for seed in (1, 2, 3):                       # three "checkpoints" of one run: same parts, other weights
        torch.manual_seed(seed)
        model = MultiTaskModel.from_config(cfg.model, list(cfg.data.tasks), seed=seed)
        d = tmp_path / f"checkpoint_{seed:06d}"
        model.save(d, tok, extra={"max_length": cfg.data.max_length})
        saved = cfg.to_dict()
        saved["train"]["average_last"] = 3       # written by the raymtl that had it: evaluate reads the data only
        (d / "config.json").write_text(json.dumps(saved))
        (d / "metrics.json").write_text(json.dumps({"val_sst": 0.1 * seed, "overall": 0.2}))
        dirs.append(d)
    average = bench("average")
    assert average.main([*map(str, dirs), "--output", str(tmp_path / "avg")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path.name}/checkpoint_000002: val_sst=0.2000 overall=0.2000" in out
    assert "overall" in out.split("average of 3")[1]
    for f in ("heads.safetensors", "encoder/model.safetensors"):
        mine, three = load_file(str(tmp_path / "avg" / f)), [load_file(str(d / f)) for d in dirs]
        assert mine.keys() == three[0].keys()
        for k, v in mine.items():
            torch.testing.assert_close(v, torch.stack([t[k] for t in three]).mean(0), msg=f"{f} {k}")
    # --ensemble: three copies of one checkpoint score as that checkpoint; three models as the mean of their
    # log-probabilities (SST, by hand here); checkpoints validated on other splits are refused
    assert average.main([str(dirs[0])] * 3 + ["--output", str(tmp_path / "same"), "--ensemble"]) == 0
    same = capsys.readouterr().out.split("average of 3")[1]
    averaged, ensembled = same.split("ensemble of 3 checkpoints:")
    assert ensembled.strip() == averaged.split(str(tmp_path / "same"))[1].strip()
    assert average.main([*map(str, dirs), "--output", str(tmp_path / "avg3"), "--ensemble"]) == 0
    ensembled = capsys.readouterr().out.split("ensemble of 3 checkpoints:")[1]
    import raymtl
    from raymtl.analysis.evaluation import row_batches
    from raymtl.cli import validation_rows
    rows = validation_rows(dirs[0], ["sst"])["sst"]
    logp = []
    for d in dirs:
        m = raymtl.load(d, "cpu")
        m.model.eval()
        with torch.no_grad():
            logp.append(torch.cat([m.model("sst", b).log_softmax(-1)
                                   for b in row_batches(m.model, m.tokenizer, "sst", rows, m.max_length)]))
    hand = (torch.stack(logp).mean(0).argmax(-1).numpy() == [r["label"] for r in rows]).mean()
    assert re.search(r"SST accuracy\s+([\d.]+)", ensembled).group(1) == f"{hand:.4f}"
    moved = json.loads((dirs[2] / "config.json").read_text())
    moved["data"]["split_seed"] += 1
    (dirs[2] / "config.json").write_text(json.dumps(moved))
    with pytest.raises(SystemExit):                   # refused before anything is written
        average.main([*map(str, dirs), "--output", str(tmp_path / "avg4"), "--ensemble"])
    assert "an ensemble is scored on one split" in capsys.readouterr().err and not (tmp_path / "avg4").exists()
    with pytest.raises(SystemExit):              # a checkpoint of another run (other parts) is refused
        other = MultiTaskModel.from_config(cfg.replace(pals=False, task_layers={}).model, ["sst"], seed=4)
        other.save(tmp_path / "other", tok, extra={"max_length": cfg.data.max_length})
        average.main([str(dirs[0]), str(tmp_path / "other"), "--output", str(tmp_path / "avg2")])
    assert "average checkpoints of one run" in capsys.readouterr().err


def test_ood_smoke_scores_every_set_with_its_target_head(capsys, tmp_path):
    assert bench("ood").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 1 and "written to" not in out                  # --smoke writes nothing
    sick, mrpc, cfimdb = (float(x) for x in rows[0][1:4])
    assert -1 <= sick <= 1 and 0 <= mrpc <= 1 and 0 <= cfimdb <= 1
    assert "| checkpoint | sick (sts head) | mrpc (quora head) | cfimdb (sst head) | validation | path |" in out
    # a single-task checkpoint scores the sets of its one head; the others are "-"
    bench("ood").tiny_checkpoint(tmp_path / "sst", tasks=("sst",))
    assert bench("ood").main(["--smoke", f"sst-only={tmp_path / 'sst'}"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| sst-only |")).split(" | ")
    assert row[1:3] == ["-", "-"] and 0 <= float(row[3]) <= 1 and row[4] == "-"     # no metrics.json: no validation
    for argv, says in ((["--smoke", "--sets", "sick,nosuch"], "unknown related data set 'nosuch'"),
                       ([f"sst-only={tmp_path / 'sst'}", "--sets", "sick"], "has none of the heads ['sts']"),
                       (["bad"], "checkpoints are NAME=CKPT"),
                       ([f"x={tmp_path}"], f"x={tmp_path}: not a raymtl checkpoint (no raymtl.json)"),
                       ([], "give at least one NAME=CKPT (or --smoke)")):
        with pytest.raises(SystemExit):
            bench("ood").main(argv)
        assert says in capsys.readouterr().err
