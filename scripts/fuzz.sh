#!/bin/sh
# make fuzz: the hypothesis fuzz tests, one pytest per file, as many at a time as there are CPUs (the 100,000-case
# run takes about an hour of CPU), then every atheris harness.  Logs and crash inputs go to var/fuzz/.
# Usage: scripts/fuzz.sh PYTHON EXAMPLES
set -eu
PY=$1
N=$2
mkdir -p var/fuzz
start=$(date +%s)
status=0
ls tests/fuzz/test_fuzz_*.py | xargs -P "$(nproc)" -I{} sh -c '
    log=var/fuzz/$(basename "$1" .py).log
    if RTLS_FUZZ_EXAMPLES=$2 "$0" -m pytest -q -p no:cacheprovider --hypothesis-show-statistics "$1" >"$log" 2>&1
    then echo "ok    $1 ($(tail -n 1 "$log"))"
    else echo "FAIL  $1: see $log"; exit 1
    fi' "$PY" {} "$N" || status=1
for log in var/fuzz/test_fuzz_*.log; do
    # hypothesis' own count of the cases each test ran
    grep -E "^tests/fuzz/.*::|passing, .* failing|Stopped because" "$log" | sed 's/^ *- /      /; s/^tests/    tests/'
done
echo "hypothesis: $(( $(date +%s) - start )) s"
[ "$status" = 0 ] || { echo "make fuzz: a hypothesis test failed"; exit 1; }
"$PY" tests/fuzz/atheris_harness.py all -runs="$N" -timeout=10 -artifact_prefix=var/fuzz/
echo "make fuzz: clean ($(( $(date +%s) - start )) s)"
