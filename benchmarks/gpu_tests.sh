#!/usr/bin/env bash
# The GPU tests on the device machine, made to survive its 10-minute limit: pytest stops itself
# (SIGINT) after GPU_TESTS_LIMIT seconds, and each failure's name and traceback are written to
# $OUT/failures.txt as it happens (tests/conftest.py, FEATATTN_FAILURE_LOG), so an interrupted
# run still says what failed.  The full log goes to $OUT/gpu_tests.log.
#
#   bash benchmarks/gpu_tests.sh                                  # every cuda / on_device test
#   bash benchmarks/gpu_tests.sh tests/test_hybrid.py -k "not float32"
#   GPU_TESTS_SHARD=1/2 bash benchmarks/gpu_tests.sh tests/kernels   # every 2nd test from the
#   GPU_TESTS_SHARD=2/2 bash benchmarks/gpu_tests.sh tests/kernels   # 1st, then the others
set -u
out=${OUT:-/tmp/featattn_gpu_tests}
mkdir -p "$out"
: > "$out/failures.txt"
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
export FEATATTN_FAILURE_LOG=$out/failures.txt
[ -z "${GPU_TESTS_SHARD:-}" ] || export FEATATTN_TEST_SHARD=$GPU_TESTS_SHARD
[ $# -gt 0 ] || set -- tests
timeout -k 30 -s INT "${GPU_TESTS_LIMIT:-540}" python3 -m pytest -q -p no:cacheprovider \
    -m "cuda or on_device" -n "${GPU_TESTS_WORKERS:-16}" --tb=short "$@" > "$out/gpu_tests.log" 2>&1
rc=$?
grep -E "passed|failed" "$out/gpu_tests.log" | grep -v INTERNALERROR | tail -1
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "(stopped by the ${GPU_TESTS_LIMIT:-540} s limit: the counts above are partial)"
elif [ $rc -ne 0 ] && [ $rc -ne 1 ]; then
    echo "(pytest exit code $rc: collection errors or an internal error; see $out/gpu_tests.log)"
    tail -5 "$out/gpu_tests.log"
fi
if [ -s "$out/failures.txt" ]; then
    grep "^FAILED " "$out/failures.txt"
    echo "--- tracebacks (first 6000 bytes of $out/failures.txt):"
    head -c 6000 "$out/failures.txt"
else
    echo "no failures recorded"
fi
exit $rc
