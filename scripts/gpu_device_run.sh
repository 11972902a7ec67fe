#!/usr/bin/env bash
# The GPU acceptance run on a device without Ray/DeepSpeed/hub access: everything it lacks is carried
# in .gpu/ (git-ignored; how to build it: docs/performance.md, "Scaling out"). Run from the repo root:
#   BUDGET=360 NOTE="..." GC_ARGS="--checks zero,fusion" bash scripts/gpu_device_run.sh   (report: $OUT/gpu_check.md)
set -uo pipefail
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
t0=$(date +%s)
nvidia-smi -L; python3 -V
SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
tar xJf .gpu/ray.tar.xz -C "$SP" || exit 3
chmod -R a+x "$SP/ray/core"
python3 -m pip install -q --no-index --no-deps .gpu/*.whl 2>&1 | tail -3
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
export PYTHONPATH=$PWD
mkdir -p /tmp/d && tar xJf .gpu/data.tar.xz -C /tmp/d || exit 4
python3 - <<'PY' || exit 5
import shutil, glob, torch
from transformers import BertConfig, BertModel
torch.manual_seed(0)
BertModel(BertConfig.from_pretrained(".gpu/minilm"), add_pooling_layer=False).save_pretrained("/tmp/minilm-random")
for f in glob.glob(".gpu/minilm/*"):
    if "token" in f or "vocab" in f or "special" in f:
        shutil.copy(f, "/tmp/minilm-random/")
PY
python3 -c "import ray, deepspeed, transformers, torch, torchjd, raymtl; print('ray', ray.__version__, 'ds', deepspeed.__version__, 'tf', transformers.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())" || exit 6
echo "[device] setup $(( $(date +%s) - t0 )) s"
python3 scripts/gpu_check.py --data-dir /tmp/d/data --encoder /tmp/minilm-random --output /tmp/gc \
  --report "$OUT/gpu_check.md" --budget-s "${BUDGET:-400}" ${GC_ARGS:-} \
  --note "$NOTE" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
for f in /tmp/gc/mtl/*/*/metrics.json; do [ -f "$f" ] && cp "$f" "$OUT/mtl-metrics.json"; done
echo "[device] total $(( $(date +%s) - t0 )) s, gpu_check rc $rc"
