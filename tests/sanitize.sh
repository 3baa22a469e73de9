#!/usr/bin/env bash
# The multi-process tests under AddressSanitizer + UndefinedBehaviorSanitizer,
# then a valgrind leak check of the C core.
#
#   bash tests/sanitize.sh                 # collectives, errors, faults, security, fuzz tests
#   bash tests/sanitize.sh tests/e2e/test_collectives.py -k every_dtype   # any pytest arguments
#   SKIP_VALGRIND=1 bash tests/sanitize.sh ...
#
# Works on a copy of this checkout in a temporary folder (PYCOLL_SANITIZE=1
# build), so your own build is left alone. Any ASan or UBSan report kills
# the process that hit it, so the test fails. LeakSanitizer is off inside
# Python (the interpreter keeps memory at exit on purpose); leaks are checked
# by valgrind on the C core driven by tests/fuzz/fuzz_wire.c instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/pycoll-sanitize.XXXXXX)
trap 'rm -rf "$work"' EXIT
(cd "$root" && git ls-files -co --exclude-standard | tar -cf - -T -) | tar -xf - -C "$work"
cd "$work"
PYCOLL_SANITIZE=1 python3 setup.py -q build_ext --inplace --force >build.log 2>&1 || { cat build.log; exit 1; }

tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
    tests=(tests/e2e/test_collectives.py tests/e2e/test_errors.py tests/e2e/test_faults.py tests/e2e/test_security.py tests/fuzz/test_fuzz.py)
fi
echo "== ASan + UBSan: pytest ${tests[*]}"
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
PYTHONPATH="$work" python3 -m pytest -q -p no:cacheprovider "${tests[@]}"

if [ -z "${SKIP_VALGRIND:-}" ] && command -v valgrind >/dev/null; then
    echo "== valgrind: the C core (plans, comms, runs that succeed and runs that fail) for 3000 inputs"
    # The C sources: csrc/Makefile's SOURCES, the one list of them.
    src=$(make -s --no-print-directory -C csrc print-sources | sed 's|\([^ ]*\)|csrc/\1|g')
    inc=$(make -s --no-print-directory -C csrc print-include-dirs | sed 's|\([^ ]*\)|-Icsrc/\1|g')
    [ -n "$src" ] || { echo "no C sources from make -C csrc print-sources" >&2; exit 1; }
    # shellcheck disable=SC2086
    gcc -std=c99 -O1 -g $inc tests/fuzz/fuzz_wire.c $src -lssl -lcrypto -o fuzz_wire_plain
    valgrind --quiet --leak-check=full --show-leak-kinds=definite,indirect,possible \
        --errors-for-leak-kinds=definite,indirect,possible --error-exitcode=99 ./fuzz_wire_plain 3000 1
    echo "valgrind: no leak, no invalid access"
fi
