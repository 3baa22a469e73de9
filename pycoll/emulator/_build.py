"""Compile csrc/tools/delayline.c on first use, cached by source hash.

The binary lands in ``~/.cache/pycoll/delayline-<sha>`` (or
``$PYCOLL_CACHE_DIR``).  It is built in a private temp dir and renamed into
place so concurrent first uses cannot see a half-written file.
Overrides: ``PYCOLL_DELAYLINE_BIN`` (use this binary as is),
``PYCOLL_DELAYLINE_SRC`` (source path), ``CC``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra"]


def source_path() -> Path:
    env = os.environ.get("PYCOLL_DELAYLINE_SRC")
    if env:
        return Path(env)
    # pycoll/emulator/_build.py -> repo root is two levels above the package.
    return Path(__file__).resolve().parents[2] / "csrc" / "tools" / "delayline.c"


def cache_dir() -> Path:
    env = os.environ.get("PYCOLL_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.path.expanduser("~")) / ".cache" / "pycoll"


def compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return cc
    for c in ("cc", "gcc", "clang"):
        if shutil.which(c):
            return c
    return None


def delayline_binary() -> str:
    """Path of a compiled delay line, building it if needed."""
    env = os.environ.get("PYCOLL_DELAYLINE_BIN")
    if env:
        return env
    src = source_path()
    if not src.is_file():
        raise RuntimeError(f"delay line source not found at {src} (set PYCOLL_DELAYLINE_SRC)")
    data = src.read_bytes()
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc/clang) to build the delay line")
    h = hashlib.sha256(data + " ".join([cc] + CFLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / f"delayline-{h}"
    if out.is_file() and os.access(out, os.X_OK):
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pycoll-build-") as td:
        tmp = Path(td) / "delayline"
        r = subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(src)], capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {src} failed:\n{r.stderr}")
        staged = out.parent / f".{out.name}.{os.getpid()}.tmp"
        shutil.copy2(tmp, staged)
        os.replace(staged, out)
    return str(out)
