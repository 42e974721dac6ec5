#!/usr/bin/env bash
# Flake check: run the whole suite N times (the README's `make test` command) and the torchrun test M times,
# then print how many runs failed and which tests failed how often.
#
#   bash benchmarks/flake_check.sh [N] [M]      # defaults N=10, M=20; N=0 or M=0 skips that part
#
# Expect about N x 2-3 min + M x 1-2 min on a 2-core machine; run it when the machine is otherwise idle.
# Logs of failed runs are kept (their folder is printed); exit status 1 when any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-10}
M=${2:-20}
PY=${PYTHON:-.venv/bin/python}
TORCHRUN_TEST="tests/test_distributed.py::test_two_processes_train_resume_and_evaluate_like_one"
logs=$(mktemp -d "${TMPDIR:-/tmp}/mulan-flake.XXXXXX")

# run NAME I COMMAND...: one run, its log kept only when it failed; prints a line per run
run() {
    local name=$1 i=$2
    shift 2
    local log="$logs/$name.$i.log" t0=$SECONDS
    if "$@" >"$log" 2>&1; then
        echo "$name run $i: passed ($((SECONDS - t0)) s): $(grep -E '[0-9]+ passed' "$log" | tail -1)"
        rm -f "$log"
        return 0
    fi
    echo "$name run $i: FAILED ($((SECONDS - t0)) s): $(tail -1 "$log")"
    grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /'
    grep -q 'terminate called' "$log" && echo "    (a process printed 'terminate called ...')"
    return 1
}

suite_failed=0
for i in $(seq 1 "$N"); do
    run suite "$i" "$PY" -m pytest -n 2 -q -p no:cacheprovider tests || suite_failed=$((suite_failed + 1))
done
torchrun_failed=0
for i in $(seq 1 "$M"); do
    run torchrun "$i" "$PY" -m pytest -q -p no:cacheprovider "$TORCHRUN_TEST" || torchrun_failed=$((torchrun_failed + 1))
done

echo
echo "whole suite: $suite_failed of $N runs failed"
echo "torchrun test: $torchrun_failed of $M runs failed"
if [ $((suite_failed + torchrun_failed)) -gt 0 ]; then
    echo "failed tests (count of runs):"
    cat "$logs"/*.log 2>/dev/null | grep -E '^(FAILED|ERROR) ' | sed -E 's/ - .*//' | sort | uniq -c | sort -rn | sed 's/^/  /'
    echo "logs of the failed runs: $logs"
    exit 1
fi
rmdir "$logs" 2>/dev/null
exit 0
