"""cffi build script: compiles csrc/ into the extension ``pycoll.core._core``.

The declarations cffi needs come from csrc/include/pycoll.h itself (preprocessor
lines stripped, integer #defines kept), so Python and C cannot drift apart.
The C sources are the SOURCES list of csrc/Makefile, the one list of them
(the static library, tests/sanitize.sh and tests/fuzz/run.sh read it too).
Set PYCOLL_SANITIZE=1 for an ASan/UBSan build, PYCOLL_CFLAGS for extra flags.
"""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")


def makefile_sources(path=os.path.join(CSRC, "Makefile")):
    """The paths of the one ``SOURCES = core/a.c plan/b.c ...`` assignment in a Makefile.

    Strict on purpose, so that make and this script can never read two
    different lists: exactly one assignment, with ``=`` or ``:=``
    (backslash-continued lines allowed, a trailing ``# comment`` ignored),
    only ``folder/name.c`` paths under the Makefile's folder without make syntax,
    no duplicates, and each file present. Anything else raises ValueError.
    """
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: it lists the C sources (an incomplete sdist? see MANIFEST.in)"
                                ) from None
    lines = re.sub(r"\\\n", " ", text).splitlines()  # make joins a backslash-newline into one space
    found = []
    for line in lines:
        if re.match(r" *(?:define|undefine)\s+SOURCES\b", line):
            raise ValueError(f"{path}: SOURCES must be a plain assignment, not {line.split()[0]}")
        m = re.match(r" *(?:override\s+|export\s+)?SOURCES\s*([:+?!]*=)(.*)", line)
        if m:
            found.append((m.group(1), m.group(2)))
    if len(found) != 1:
        raise ValueError(f"{path}: expected one SOURCES assignment, found {len(found)}")
    op, value = found[0]
    if op not in ("=", ":="):
        raise ValueError(f"{path}: SOURCES must be set with = or :=, not {op}")
    names = value.split("#", 1)[0].split()
    part = r"[A-Za-z0-9_][A-Za-z0-9_-]*"
    bad = [n for n in names if not re.fullmatch(rf"(?:{part}/)*{part}\.c", n)]
    if bad or not names:
        raise ValueError(f"{path}: SOURCES must list folder/file.c paths under csrc/, got {bad or 'nothing'}")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: SOURCES lists a file twice")
    missing = [n for n in names if not os.path.isfile(os.path.join(os.path.dirname(path), n))]
    if missing:
        raise ValueError(f"{path}: SOURCES names files that do not exist: {missing}")
    return names


SOURCES = makefile_sources()
#: the header folders: include/ (the public pycoll.h) and every folder with a source (as the Makefile)
INCLUDE_DIRS = ["include"] + sorted({os.path.dirname(s) for s in SOURCES})


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
    ffi.cdef(header_cdef(os.path.join(CSRC, "include", "pycoll.h")))
    cflags = ["-std=c99", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-strict-aliasing", "-pthread"]
    ldflags = ["-pthread", "-lssl", "-lcrypto"]  # hash.c hashes on several threads; transport_tls.c
    if os.environ.get("PYCOLL_SANITIZE"):
        cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
        ldflags += ["-fsanitize=address,undefined"]
    cflags += os.environ.get("PYCOLL_CFLAGS", "").split()
    ffi.set_source(
        "pycoll.core._core",
        '#include "pycoll.h"',
        sources=[os.path.join("csrc", s) for s in SOURCES],
        include_dirs=[os.path.join("csrc", d) for d in INCLUDE_DIRS],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    return ffi


ffibuilder = build_ffi()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
