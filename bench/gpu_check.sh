#!/usr/bin/env bash
# The GPU check, prepared: on a CUDA machine, in one call of a few minutes,
#   1. build the fused CUDA scan kernels (Mamba-1, Mamba-2's SSD) for the local GPU (timed),
#   2. run the GPU-marked tests,
#   3. run bench/scan.py and bench/generate.py at GPU shapes,
# and write each step's output as a table under bench/results/ (and $OUT, when set) headed by the
# commit, the command and the device.
#
#   make gpu-wheels                          # here, once: the wheels a bare GPU machine lacks -> .whl/
#   LETHE_COMMIT=$(git rev-parse HEAD) make gpu-check     # on the GPU machine (carry .whl)
#
# It uses the machine's own python3 and torch (whatever CUDA build they are), never installs
# torch, and puts src/ on PYTHONPATH instead of installing Lethe (whose torch pin would pull
# another torch). Packages the machine lacks (hydra-core, omegaconf) come from
# the carried .whl/ folder into a private target directory.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# pure-Python packages the GPU tests and benchmarks import that a bare CUDA image lacks (they need
# neither datasets nor wandb); antlr4 4.9.3 (omegaconf's parser) has no wheel on PyPI: built here
WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1)
SDISTS=(antlr4-python3-runtime==4.9.3)

if [ "${1:-}" = "--download-wheels" ]; then
  PIP=${PIP:-.venv/bin/python -m pip}
  mkdir -p .whl
  $PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "${WHEELS[@]}" || exit 1
  $PIP wheel --quiet --no-deps -w .whl "${SDISTS[@]}" || exit 1
  ls .whl
  exit 0
fi

PY=${PYTHON:-python3}
RESULTS=$ROOT/bench/results
STAMP=$(date -u +%Y-%m-%dT%H:%MZ)
COMMIT=${LETHE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (pass LETHE_COMMIT=<sha>)")}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
status=0

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: no CUDA device visible to $PY (torch.cuda.is_available() is False); run this on a GPU machine" >&2
  exit 2
fi
if ! $PY -c "import hydra, omegaconf" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: hydra-core/omegaconf are missing here and no .whl/ was carried; run \`make gpu-wheels\` on a machine with the registry and carry .whl" >&2
    exit 2
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lethe-site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/lethe-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT/src:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEVICE=$($PY -c "import torch; print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}')")
mkdir -p "$RESULTS"

# run NAME COMMAND...: the command's output (stdout and stderr) into bench/results/gpu-NAME.md, headed
run() {
  local name=$1; shift
  local file=$RESULTS/gpu-$name.md
  {
    echo "# GPU check: $name"
    echo
    echo "- commit: \`$COMMIT\`"
    echo "- device: $DEVICE"
    echo "- date: $STAMP"
    echo "- command: \`$*\` (bench/gpu_check.sh, \`make gpu-check\`)"
    echo
    echo '```'
  } > "$file"
  local start=$SECONDS
  timeout "$STEP_TIMEOUT" "$@" 2>&1 | tee -a "$file"
  local rc=${PIPESTATUS[0]}
  printf '```\n\nexit status %s after %s s\n' "$rc" "$((SECONDS - start))" >> "$file"
  echo "== $name: exit $rc, $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || status=1
  if [ -n "${OUT:-}" ]; then cp "$file" "$OUT/"; fi
}

echo "== $DEVICE, commit $COMMIT"
run kernel-build $PY -m lethe.ops.kernel_build
run tests $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_scan.py tests/test_kernels.py tests/test_generation.py \
  tests/test_documents.py tests/test_ssd.py tests/test_ssd_cuda_kernel.py tests/test_hybrid.py tests/test_flops.py
run scan-bf16 $PY bench/scan.py --device cuda --dtype bfloat16 --rounds 5 --repeats 3
run scan-fp32 $PY bench/scan.py --device cuda --dtype float32 --rounds 3 --repeats 3 --shapes 8,1536,2048,16 1,1536,8192,16 \
  --ssd-shapes 8,24,64,128,2048
run train-step-bf16 $PY bench/train_step.py --device cuda --dtype bfloat16 --d-model 768 --layers 24 --vocab 50280 \
  --shapes 8,2048 --rounds 3 --models lethe-mamba lethe-mamba2 lethe-hybrid lethe-transformer \
  --hybrid-pattern 'MMMMMM*MMMMMMMMMMM*MMMMM'
run attention-bf16 $PY bench/attention.py --device cuda --dtype bfloat16 --rounds 5 --repeats 3
run generate $PY bench/generate.py --device cuda --pairs mamba-130m:mamba2-130m:mamba2-hybrid-130m:transformer-125m --vocab 50280 \
  --batches 1 16 --prompts 128 2048 --new-tokens 64 --repeats 2 --cuda-graph
echo "== done: tables in $RESULTS/gpu-*.md (exit $status)"
exit $status
