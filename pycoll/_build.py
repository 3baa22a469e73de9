"""cffi build script: compiles csrc/ into the extension ``pycoll._core``.

The declarations cffi needs come from csrc/pycoll.h itself (preprocessor
lines stripped, integer #defines kept), so Python and C cannot drift apart.
Set PYCOLL_SANITIZE=1 for an ASan/UBSan build, PYCOLL_CFLAGS for extra flags.
"""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
# Keep SOURCES on one line: tests/sanitize.sh reads it with sed.
SOURCES = ["reduce.c", "codec.c", "plan.c", "plan_ring.c", "plan_tree.c", "plan_direct.c", "plan_hier.c", "plan_custom.c", "plan_codec.c", "engine.c", "transport_tcp.c", "transport_shm.c", "hash.c"]


def header_cdef(path):
    """The header's declarations in a form cffi's parser accepts."""
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)  # comments may span #define lines
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            m = re.match(r"#define\s+(PC_\w+)\s+(\d+)u?\b", stripped)
            if m:
                out.append(f"#define {m.group(1)} {m.group(2)}")
            continue
        out.append(line)
    return "\n".join(out)


def build_ffi():
    ffi = FFI()
    ffi.cdef(header_cdef(os.path.join(CSRC, "pycoll.h")))
    cflags = ["-std=c99", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-strict-aliasing", "-pthread"]
    ldflags = ["-pthread"]  # hash.c hashes large buffers on several threads
    if os.environ.get("PYCOLL_SANITIZE"):
        cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
        ldflags += ["-fsanitize=address,undefined"]
    cflags += os.environ.get("PYCOLL_CFLAGS", "").split()
    ffi.set_source(
        "pycoll._core",
        '#include "pycoll.h"',
        sources=[os.path.join("csrc", s) for s in SOURCES],
        include_dirs=["csrc"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    return ffi


ffibuilder = build_ffi()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
