"""Compile the delay line (``delayline.c``) on first use, cached by source hash.

The source ships inside the package (``pycoll/emulator/delayline.c``, copied
from ``csrc/tools/delayline.c`` when the wheel is built); in a checkout or an
editable install it is read from ``csrc/tools/`` directly.  The binary lands in
``$PYCOLL_CACHE_DIR`` or ``$XDG_CACHE_HOME/pycoll`` (default
``~/.cache/pycoll``), ``delayline-<sha>``; if that cannot be created, in a
per-user folder under the temp dir.  It is built in a private temp dir and
renamed into place so concurrent first uses cannot see a half-written file.
Overrides: ``PYCOLL_DELAYLINE_BIN`` (use this binary as is),
``PYCOLL_DELAYLINE_SRC`` (source path), ``CC``.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra"]


SOURCE_NAME = "delayline.c"


def source_candidates() -> list[Path]:
    """Where the source may be, in order: beside this module (installed
    package), then the checkout's csrc/tools/ (editable install)."""
    here = Path(__file__).resolve().parent
    return [here / SOURCE_NAME, here.parents[1] / "csrc" / "tools" / SOURCE_NAME]


def source_path() -> Path:
    env = os.environ.get("PYCOLL_DELAYLINE_SRC")
    if env:
        return Path(env)
    cands = source_candidates()
    for c in cands:
        if c.is_file():
            return c
    return cands[0]


def cache_dir() -> Path:
    env = os.environ.get("PYCOLL_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path(os.path.expanduser("~")) / ".cache"
    return base / "pycoll"


def _fallback_cache_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"pycoll-cache-{uid}"


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
        raise RuntimeError(f"delay line source not found at {src} (looked in "
                           f"{', '.join(map(str, source_candidates()))}; set PYCOLL_DELAYLINE_SRC)")
    data = src.read_bytes()
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc/clang) to build the delay line")
    h = hashlib.sha256(data + " ".join([cc] + CFLAGS).encode()).hexdigest()[:16]
    name = f"delayline-{h}"
    dirs = [cache_dir()]
    if "PYCOLL_CACHE_DIR" not in os.environ:
        dirs.append(_fallback_cache_dir())
    for d in dirs:
        out = d / name
        if out.is_file() and os.access(out, os.X_OK):
            return str(out)
    errors = []
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not os.access(d, os.W_OK | os.X_OK):
                raise PermissionError(f"{d} is not writable")
        except OSError as e:
            errors.append(f"{d}: {e}")
            continue
        return str(_compile(cc, src, d / name))
    raise RuntimeError("no writable cache dir for the delay line (set PYCOLL_CACHE_DIR): "
                       + "; ".join(errors))


def _compile(cc: str, src: Path, out: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="pycoll-build-") as td:
        tmp = Path(td) / "delayline"
        r = subprocess.run([*shlex.split(cc), *CFLAGS, "-o", str(tmp), str(src)], capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {src} failed:\n{r.stderr}")
        staged = out.parent / f".{out.name}.{os.getpid()}.tmp"
        shutil.copy2(tmp, staged)
        os.replace(staged, out)
    return out
