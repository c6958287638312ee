#!/usr/bin/env bash
# The GPU tests on the device machine, made to survive its 10-minute limit: pytest stops itself
# (SIGINT) after GPU_TESTS_LIMIT seconds, and each failure's name and traceback are written to
# $OUT/failures.txt as it happens (tests/conftest.py, FEATATTN_FAILURE_LOG), so an interrupted
# run still says what failed.  The full log goes to $OUT/gpu_tests.log.
#
#   bash benchmarks/gpu_tests.sh                                  # every cuda / on_device test
#   bash benchmarks/gpu_tests.sh tests/test_hybrid.py -k "not float32"
set -u
out=${OUT:-/tmp/featattn_gpu_tests}
mkdir -p "$out"
: > "$out/failures.txt"
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
export FEATATTN_FAILURE_LOG=$out/failures.txt
[ $# -gt 0 ] || set -- tests
timeout -s INT "${GPU_TESTS_LIMIT:-540}" python3 -m pytest -q -p no:cacheprovider \
    -m "cuda or on_device" -n "${GPU_TESTS_WORKERS:-16}" --tb=short "$@" > "$out/gpu_tests.log" 2>&1
rc=$?
grep -E "passed|failed" "$out/gpu_tests.log" | grep -v INTERNALERROR | tail -1
[ $rc -eq 124 ] || [ $rc -eq 130 ] || [ $rc -eq 2 ] && echo "(stopped by the ${GPU_TESTS_LIMIT:-540} s limit or interrupted, rc $rc)"
grep "^FAILED " "$out/failures.txt" || echo "no failures recorded"
head -c 6000 "$out/failures.txt"
exit $rc
