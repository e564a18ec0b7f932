#!/usr/bin/env bash
# One call on a GPU machine: build the extension, run the GPU tests
# (pytest -m cuda), then short benchmarks. Output goes to $OUT when set
# (./gpu_out otherwise).
#
#   bash scripts/gpu_check.sh                  # build + GPU tests + quick benchmarks
#   BENCH=full bash scripts/gpu_check.sh       # full benchmark sweeps
#   BENCHES="alloc" bash scripts/gpu_check.sh  # only these benchmarks; BENCHES="" for none
#   BENCHES="serve" bash scripts/gpu_check.sh  # the serving workloads (bench serve --quick, ~2 min each: pick some with BENCH_ARGS)
#   TEST_TIMEOUT=300 BENCH_TIMEOUT=120 ...     # seconds per step (0: none), so one call fits the device's limit
#   TESTS=0 BENCHES=serve BENCH_ARGS="--workload offline" ...  # no tests; extra arguments for every benchmark
#   TEST_WORKERS=10 bash scripts/gpu_check.sh   # the CUDA suite over 10 pytest-xdist processes sharing the GPU
#                                                # (pytest-xdist is in the device image)
#   TEST_PER_TEST_TIMEOUT=120 ...                # fail (with a stack) any test that runs longer
#   PYTEST_ARGS="tests/test_x.py" PYTEST_K="decode and not flex" ...  # files (split on spaces) and a -k expression
#   TEST_SHARD=1/2 BENCHES="" bash scripts/gpu_check.sh   # every 2nd test file from the 1st: the CUDA suite
#                                                        # in two device calls (then TEST_SHARD=2/2)
# With .whl/ holding FlashInfer's wheels (carry .whl and .fi_cache) its backend and anchor rows run too.
#   DIAGS="host" DIAG_ARGS="--configs virtual-per_layer,paged-256" BENCHES="" ...  # scripts/diag_host.py
#   DIAGS="decode" TESTS=0 BENCHES="" ...      # scripts/diag_decode.py: small-batch decode launch sweep
#   DIAGS="read" TESTS=0 BENCHES="" ...        # scripts/diag_read.py: the read bandwidth ceiling beside the copy's
#   DIAGS="maps" TESTS=0 BENCHES="" ...        # scripts/diag_maps.py: do page maps slow the kernels in flight?
#   DIAGS="prefill" TESTS=0 BENCHES="" ...     # scripts/diag_prefill.py: FlashInfer prefill through our backend vs direct
#   DIAGS="ab" DIAG_ARGS="--baseline .ab/triton_kernels" ...  # scripts/diag_ab.py: our Triton kernels against an
#                                                # earlier copy (git archive <commit> triton_kernels | tar x -C .ab; carry .ab)
#   CLOCKS=1 ...                                # log SM clock, power, temperature and throttle reasons every
#                                                # 200 ms to $OUT/clocks.csv (do timings move with the clocks?)
#   FI_CACHE_OUT=1 ...                          # pack FlashInfer's JIT cache into $OUT/fi_cache.tgz (parts
#                                                # fi_cache.tgz.part-* past 15 MiB: cat them): copy it to
#                                                # .fi_cache.tgz here and carry that (kernels not rebuilt)
#   COMPILE_CACHE_OUT=1 ...                     # also pack torch.compile's caches into $OUT/compile_cache.tgz:
#                                                # copy it to .compile_cache.tgz here and carry that next time
#                                                # (Engine(compile=True) then skips most of its ~90 s)
set -uo pipefail
cd "$(dirname "$0")/.."
# Logs go straight to $FINAL (they survive a timeout); benchmark reports (JSON,
# markdown, plots) are packed into $FINAL/results.tgz at the end.
FINAL=${OUT:-gpu_out}
OUT=$(mktemp -d)
mkdir -p "$FINAL"
export PYTHONUNBUFFERED=1 TORCH_VKV_BENCH_DIR="$OUT" TORCH_VKV_FAILURE_LOG="$FINAL/failures.log" \
  TORCH_VKV_DURATIONS_LOG="$FINAL/durations.log"  # each test's seconds as it ends (sort -rn it)
QUICK=--quick
[ "${BENCH:-quick}" = full ] && QUICK=
status=0
run() {  # run NAME SECONDS CMD...: log to $FINAL/NAME.log (SECONDS 0: no limit), remember failures
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$FINAL/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-15}" "$FINAL/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}
# FlashInfer, when its wheels were carried (bash ../shared/tools/flashinfer-wheels.sh puts them in .whl/):
# installed outside the venv, JIT-compiled with the machine's nvcc; the compiled kernels go to .fi_cache/
# (carry it too, and decode/FA3 kernels are not rebuilt: 13-25 s and ~100 s each otherwise).
if ls .whl/flashinfer_python-*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  mkdir -p .fi_cache
  # A packed cache from an earlier call (FI_CACHE_OUT=1 writes it; carry it as .fi_cache.tgz): unpacked with
  # its own time stamps, the installed wheels dated back, so ninja keeps its objects (scripts/unpack_fi_cache.sh).
  [ -f .fi_cache.tgz ] && bash scripts/unpack_fi_cache.sh .fi_cache.tgz .fi_cache /tmp/site
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a} \
    FLASHINFER_DECODE_AUTO_CUDNN=0 FLASHINFER_WORKSPACE_BASE="$PWD/.fi_cache"
fi
# Inductor's and Triton's caches in a folder that can travel (carry .compile_cache): warm compiles.
mkdir -p .compile_cache
# The packed form travels better (the carry limit is 64 MiB; the caches are ~85 MiB, ~13 MiB packed).
[ -f .compile_cache.tgz ] && tar xzf .compile_cache.tgz -C .compile_cache
export TORCHINDUCTOR_CACHE_DIR="$PWD/.compile_cache/inductor" TRITON_CACHE_DIR="$PWD/.compile_cache/triton"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$FINAL/gpu.txt"
clock_pid=""
if [ "${CLOCKS:-0}" = 1 ]; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv -lms 200 >"$FINAL/clocks.csv" 2>&1 &
  clock_pid=$!
fi
# An (editable) install, not build_ext --inplace: it also maps triton_kernels/ to
# torch_vkv.triton_kernels (setup.py package_dir), which has no other loader.
run build 0 python -m pip install --no-deps --no-build-isolation -e .
run info 0 python -m torch_vkv info
if [ -n "${TEST_SHARD:-}" ]; then  # i/n: test files i, i+n, i+2n, ... (1-based, sorted)
  shard_files=$(ls tests/test_*.py | sort | awk -v i="${TEST_SHARD%/*}" -v n="${TEST_SHARD#*/}" '(NR - i) % n == 0')
  PYTEST_ARGS="$shard_files ${PYTEST_ARGS:-}"
fi
xdist=""  # -v: the log names every finished test, so a step cut by its limit still shows which ones were left
# Inductor compiles with a pool of one process per core in every pytest process: with many workers that
# oversubscribes the CPUs, and the compile-heavy tests are the ones that then run longest.
[ "${TEST_WORKERS:-1}" -gt 1 ] && xdist="-n $TEST_WORKERS --dist worksteal -v" \
  && export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-1}
# TEST_PER_TEST_TIMEOUT=N: a test running longer than N s fails with its stack (pytest-timeout, in the image)
[ -n "${TEST_PER_TEST_TIMEOUT:-}" ] && xdist="$xdist --timeout $TEST_PER_TEST_TIMEOUT"
[ "${TESTS:-1}" = 0 ] || run tests_gpu "${TEST_TIMEOUT:-0}" python -m pytest -rs -m cuda -p no:cacheprovider -o log_cli=false \
  --durations=20 $xdist ${PYTEST_K:+-k "$PYTEST_K"} ${PYTEST_ARGS:-}
# A test step cut by its time limit may leave pytest processes running on the GPU: stop them before
# anything is timed. The pattern is this script's own pytest line: a plain "-m pytest" also matched the
# device call's command line when that ran pytest itself, and killed the whole call.
pkill -f -- "-m cuda -p no:cacheprovider -o log_cli=false" 2>/dev/null && sleep 2
for b in ${BENCHES-alloc kernels hf}; do  # an empty BENCHES runs none
  run "bench_$b" "${BENCH_TIMEOUT:-0}" python -m torch_vkv bench "$b" $QUICK ${BENCH_ARGS:-} --out "$OUT"
done
# DIAGS="host step decode maps prefill": scripts/diag_host.py, diag_step.py, diag_decode.py, diag_maps.py, diag_prefill.py after the benchmarks (DIAG_ARGS: extra
# arguments for each; DIAG_TIMEOUT seconds each), their JSON and traces in results.tgz.
for d in ${DIAGS:-}; do
  OUT="$OUT" run "diag_$d" "${DIAG_TIMEOUT:-0}" python "scripts/diag_$d.py" ${DIAG_ARGS:-}
done
[ -n "$clock_pid" ] && kill "$clock_pid" 2>/dev/null
tar czf "$FINAL/results.tgz" -C "$OUT" .
# Files come back only up to 16 MiB each: a larger cache comes back in parts (fi_cache.tgz.part-aa, -ab, ...;
# here: cat them, in order, into .fi_cache.tgz).
[ "${FI_CACHE_OUT:-0}" = 1 ] && [ -d .fi_cache ] && tar czf "$FINAL/fi_cache.tgz" -C .fi_cache . \
  && echo "FlashInfer JIT cache: $(du -h "$FINAL/fi_cache.tgz" | cut -f1)" \
  && if [ "$(stat -c %s "$FINAL/fi_cache.tgz")" -gt $((15 << 20)) ]; then
    split -b 15M "$FINAL/fi_cache.tgz" "$FINAL/fi_cache.tgz.part-" && rm "$FINAL/fi_cache.tgz"
  fi
[ "${COMPILE_CACHE_OUT:-0}" = 1 ] && tar czf "$FINAL/compile_cache.tgz" -C .compile_cache . \
  && echo "compile cache: $(du -h "$FINAL/compile_cache.tgz" | cut -f1)"
echo "results: logs in $FINAL, benchmark reports in $FINAL/results.tgz"
exit $status
