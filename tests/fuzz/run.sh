#!/usr/bin/env bash
# Long fuzzing of the C core's wire path (tests/fuzz/fuzz_wire.c), under
# AddressSanitizer and UndefinedBehaviorSanitizer.
#
#   bash tests/fuzz/run.sh [SECONDS]        # default 300
#
# With clang (and its libFuzzer runtime) the run is coverage-guided; the
# corpus is kept in $PYCOLL_FUZZ_DIR/corpus (default /tmp/pycoll-fuzz) and
# seeded with valid frame streams. Without clang the standalone mutation
# driver runs under gcc for about as long. A crash stops the run with the
# input saved (libFuzzer: crash-* files in the current directory) and exit
# status non-zero.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-300}
out=${PYCOLL_FUZZ_DIR:-/tmp/pycoll-fuzz}
mkdir -p "$out/corpus"
# The C sources: csrc/Makefile's SOURCES, the one list of them.
src=$(make -s --no-print-directory -C csrc print-sources | sed 's|\([^ ]*\)|csrc/\1|g')
inc=$(make -s --no-print-directory -C csrc print-include-dirs | sed 's|\([^ ]*\)|-Icsrc/\1|g')
[ -n "$src" ] || { echo "no C sources from make -C csrc print-sources" >&2; exit 1; }
flags="-std=c99 -O1 -g -Wall -Wextra -Wno-unused-parameter -fno-omit-frame-pointer $inc"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

cc=${CC:-gcc}
# shellcheck disable=SC2086
$cc $flags -fsanitize=address,undefined tests/fuzz/fuzz_wire.c $src -lssl -lcrypto -o "$out/fuzz_wire_standalone"
"$out/fuzz_wire_standalone" --corpus "$out/corpus" >/dev/null   # valid streams as seeds

clang=""
for c in clang clang-19 clang-18 clang-17 clang-16 clang-15 clang-14; do
    if command -v "$c" >/dev/null; then clang=$c; break; fi
done
# shellcheck disable=SC2086
if [ -n "$clang" ] && $clang $flags -DPC_LIBFUZZER -fsanitize=fuzzer,address,undefined \
        tests/fuzz/fuzz_wire.c $src -lssl -lcrypto -o "$out/fuzz_wire_libfuzzer" 2>/dev/null; then
    echo "libFuzzer ($clang), $secs s, corpus $out/corpus"
    "$out/fuzz_wire_libfuzzer" -max_total_time="$secs" -print_final_stats=1 -timeout=10 "$out/corpus"
else
    echo "no clang with libFuzzer: standalone mutation driver for about $secs s"
    "$out/fuzz_wire_standalone" $((secs * 20000)) "${PYCOLL_FUZZ_SEED:-$RANDOM}"
fi
