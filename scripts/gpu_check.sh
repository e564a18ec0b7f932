#!/usr/bin/env bash
# One call on a GPU machine: build the extension, run the GPU tests (and the
# CPU suite on the same build), then short benchmarks. Logs go to $OUT when set.
#
#   bash scripts/gpu_check.sh            # build + tests + quick benchmarks
#   BENCH=full bash scripts/gpu_check.sh # full benchmark sweeps
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-gpu_out}
OUT=$(mktemp -d)  # everything is packed into $FINAL/results.tgz at the end
mkdir -p "$FINAL"
export PYTHONUNBUFFERED=1 TORCH_VKV_BENCH_DIR="$OUT"
QUICK=--quick
[ "${BENCH:-quick}" = full ] && QUICK=
status=0
run() {  # run NAME CMD...: log to $OUT/NAME.log, remember failures
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-15}" "$OUT/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
run build python setup.py build_ext --inplace
run info python -m torch_vkv info
run tests_gpu python -m pytest -q -rs -m cuda -p no:cacheprovider -o log_cli=false ${PYTEST_ARGS:-}
for b in ${BENCHES:-alloc kernels hf}; do
  run "bench_$b" python -m torch_vkv bench "$b" $QUICK --out "$OUT"
done
tar czf "$FINAL/results.tgz" -C "$OUT" .
echo "results: $FINAL/results.tgz (logs, JSON and markdown of every step)"
exit $status
