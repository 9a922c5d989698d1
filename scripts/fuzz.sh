#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for SECONDS each (default 10), from its seeds in
# fuzz/seeds/<target> and the corpus kept on this machine in $HVNODE_CACHE/fuzz/corpus/<target>,
# which grows with every run. A crash, a hang (an input over 10 s) or an allocation over 2 GiB
# fails the run and leaves the input in fuzz/artifacts/<target>/.
#
# With a nightly toolchain the targets are built with AddressSanitizer; without one (a fresh
# machine has only Debian's or the installed stable Rust) with the stable compiler, coverage
# instrumentation and no sanitizer.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
secs=${1:-10}
cache=${HVNODE_CACHE:-/var/cache/hvnode}
corpus=$cache/fuzz/corpus
cargo fuzz --version >/dev/null 2>&1 || { echo "error: cargo-fuzz is missing: run image/setup-host.sh" >&2; exit 1; }
if cargo +nightly --version >/dev/null 2>&1; then
    fuzz=(cargo +nightly fuzz); sanitizer=(--sanitizer address); how="nightly, AddressSanitizer"
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz); sanitizer=(--sanitizer none); how="stable, no sanitizer"
fi
mapfile -t targets < <("${fuzz[@]}" list)
echo "==> fuzz: ${#targets[@]} targets, ${secs} s each ($how)"
"${fuzz[@]}" build -O "${sanitizer[@]}"
for t in "${targets[@]}"; do
    mkdir -p "$corpus/$t"
    printf '==> fuzz %-12s ' "$t"
    if ! out=$("${fuzz[@]}" run -O "${sanitizer[@]}" "$t" "$corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 2>&1); then
        printf '%s\n' "$out" | tail -n 60
        echo "error: fuzz target $t failed: the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    printf '%s\n' "$out" | sed -n 's/^stat::number_of_executed_units: *\([0-9]*\)/\1 runs/p' | tr '\n' ' '
    echo "(corpus $(find "$corpus/$t" -type f | wc -l) inputs)"
done
