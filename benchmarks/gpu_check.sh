#!/usr/bin/env bash
# One go on a machine with an NVIDIA GPU: CUDA correctness of every lowering target that
# can run there, then `cfmc bench` (prefill/decode tokens/s against HF eager, batch 1 and 8)
# for each. Results land in $OUT (check.jsonl, bench_<target>.json/.txt).
#
#   bash benchmarks/gpu_check.sh                 # SmolLM2, export + inductor (+ tensorrt if importable)
#
# Environment: PYTHON (default .venv/bin/python, else python3), DEVICE (default cuda),
# BRICK (default examples/smol.brick), TARGETS (default: export inductor, plus tensorrt
# when torch_tensorrt imports), OUT (default out/gpu_check), BENCH_ARGS (extra cfmc bench
# arguments). With DEVICE=cpu the same steps run on CPU (tests/lower/test_lower.py does so).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${DEVICE:-cuda}
BRICK=${BRICK:-examples/smol.brick}
OUT=${OUT:-out/gpu_check}
BENCH_ARGS=${BENCH_ARGS:-}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

if [ "$DEVICE" != cpu ]; then
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))" >&2
    exit 1
  fi
  "$PYTHON" -c "import torch; print('gpu_check: device', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
fi

if [ -z "${TARGETS:-}" ]; then
  TARGETS="export inductor"
  if "$PYTHON" -c "import torch_tensorrt" 2>/dev/null; then
    TARGETS="$TARGETS tensorrt"
  else
    echo "gpu_check: torch_tensorrt does not import; the tensorrt target is skipped" >&2
  fi
fi

status=0
# shellcheck disable=SC2086  # TARGETS is a word list
"$PYTHON" benchmarks/lower_check.py --brick "$BRICK" --device "$DEVICE" --targets $TARGETS \
  --out "$OUT/artifacts" | tee "$OUT/check.jsonl" || status=1

for target in $TARGETS; do
  if [ -f "$OUT/artifacts/$target/cfm.json" ]; then
    batches=""
    [ "$target" = tensorrt ] && batches="--batch 1"   # its engines have the static batch they were built for
    # shellcheck disable=SC2086  # BENCH_ARGS and batches are word lists
    "$PYTHON" -m cfmlang bench "$OUT/artifacts/$target" --device "$DEVICE" --format json $batches $BENCH_ARGS \
      > "$OUT/bench_$target.json" || status=1
    "$PYTHON" -c "import json, sys; from cfmlang.runtime.bench import render_table; \
print(render_table(json.load(open(sys.argv[1]))))" "$OUT/bench_$target.json" | tee "$OUT/bench_$target.txt"
  fi
done
echo "gpu_check: done (status $status); results in $OUT"
exit $status
