#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one script (about 8 minutes on one H100/H200, plus
# about 3 for SEEM when its requirements are there).
#
#   bash bench/gpu_check.sh [OUT]        # OUT: where logs and JSON figures go (default
#                                        # $OUT, else runs/gpu_check)
#
# On a machine without zarr/dask, prefix the python calls through the wheel installer:
#   PY="bash .whl/run.sh python3" bash bench/gpu_check.sh
#
# Steps (each logged to OUT/<step>.log, a failing step does not stop the next):
#   1. the GPU tests: SEEM double and transformers adapters on CUDA, device post-processing,
#      the trainer on CUDA (Stage II "unimatch" with AMP, channels-last, DDP over NCCL), one
#      fixmatch.py / unimatch.py step against UniMatch's own loop with its .cuda() calls (needs
#      ../shared/upstream/unimatch beside the checkout, skipped otherwise), NCCL collectives
#      (pytest -m gpu)
#   2. annotation speed at VOC size, K = 21: DeepLabV3+ R101 and the 1x1-conv ceiling, top-k
#   3. training speed: the real loop over a bare loop, DeepLabV3+ R101, AMP, channels-last
#   4. SEEM's real code on CUDA (../shared/upstream's snapshots): `annotate run` against SEEM's
#      own forward. Needs SEEM's requirements importable by $PY (SEEM_PYTHON: the interpreter
#      that has them, default python3); offline boxes get them as wheels:
#        python -m annotate seem-requirements ../shared/upstream/seem --out .whl/seem
#        pip download -d .whl -r .whl/seem/seem-requirements.txt   (on a machine with PyPI)
#      Skipped with one line when ../shared/upstream or those packages are missing.
# The summary at the end lists each step's exit status; the figures are in OUT/*.json.
set -u
OUT_DIR="${1:-${OUT:-runs/gpu_check}}"
PY="${PY:-python3}"
mkdir -p "$OUT_DIR"
declare -A RC

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%H:%M:%S), limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    RC[$name]=$?
    tail -n 15 "$OUT_DIR/$name.log"
}

nvidia-smi -L >"$OUT_DIR/device.txt" 2>&1 && cat "$OUT_DIR/device.txt"
step pytest_gpu 240 $PY -m pytest -q -m gpu -p no:cacheprovider \
    --junitxml="$OUT_DIR/pytest_gpu.xml"
for model in r101 conv1x1; do
    step "annotate_speed_$model" 90 $PY bench/annotate_speed.py --model "$model" --device cuda \
        --size 500x375 --classes 21 --images 320 --workers 8 --profile \
        --out "$OUT_DIR/annotate_speed_$model.json"
done
step train_step 90 $PY bench/train_step.py --device cuda --amp --channels-last \
    --arch deeplabv3plus_r101 --crop 321 --workers 4 --save-every 50 --json
cp "$OUT_DIR/train_step.log" "$OUT_DIR/train_step.json"

SEEM_PYTHON="${SEEM_PYTHON:-python3}"
if [ ! -d ../shared/upstream/seem ]; then
    echo "== seem_upstream: skipped (no ../shared/upstream/seem beside the project)"
elif ! $SEEM_PYTHON -c "import timm, kornia, fvcore, einops, nltk, mpi4py, torchvision" 2>/dev/null; then
    echo "== seem_upstream: skipped ($SEEM_PYTHON lacks SEEM's requirements; see above)"
else
    step seem_upstream 420 env CONFORMALSAM_SEEM_PYTHON="$(command -v "$SEEM_PYTHON")" \
        CONFORMALSAM_SEEM_DEVICE=cuda $PY -m pytest -q -m upstream -p no:cacheprovider -rA \
        -k "seem_own_forward or prompts_seem_embedded"
fi

echo "== summary"
for name in pytest_gpu annotate_speed_r101 annotate_speed_conv1x1 train_step seem_upstream; do
    echo "$name: exit ${RC[$name]:-not run}"
done
