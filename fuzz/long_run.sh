#!/bin/sh
# A long fuzzing run: each target in turn for SECONDS seconds of its own (default 840),
# one process at a time, at the lowest priority. A run that stops on a finding is
# restarted for the rest of the target's time (the finding stays in $OUT/artifacts).
#   fuzz/long_run.sh [SECONDS] [OUT] [TARGET ...]
set -u
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-840}
OUT=${2:-/tmp/dicomnet-fuzz}
shift 2 2>/dev/null
TARGETS=${*:-"ul pdu dimse identifier dataset"}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT/artifacts"
for target in $TARGETS; do
    mkdir -p "$OUT/corpus/$target"
    start=$(date +%s)
    run=0
    while :; do
        left=$((SECONDS_EACH - ($(date +%s) - start)))
        [ "$left" -le 5 ] && break
        run=$((run + 1))
        echo "== $target run $run: $left s left" >> "$OUT/$target.log"
        PYTHONPATH=. nice -n 19 "$PYTHON" fuzz/run.py "$target" \
            "$OUT/corpus/$target" "fuzz/corpus/$target" \
            -max_total_time="$left" -timeout=10 -rss_limit_mb=1024 -max_len=16384 \
            -print_final_stats=1 -artifact_prefix="$OUT/artifacts/$target-" \
            >> "$OUT/$target.log" 2>&1
    done
done
echo "done" >> "$OUT/done"
