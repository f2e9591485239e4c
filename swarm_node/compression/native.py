"""The optional C kernels for blockwise8, built with the system C compiler, run by ctypes.

``decode_kernel()`` and ``encode_kernel()`` return the loaded kernel, or None when it is switched off
(``SWARM_NODE_NATIVE=0``), when there is no C compiler, or when compiling or loading failed (logged
once at INFO); callers then use their numpy/torch path, which gives the same bytes. Nothing is
compiled at import: the first call that may build compiles ``_blockwise8.c`` (~0.5 s) into
``$SWARM_CACHE_DIR/native`` (default ``~/.cache/swarm-node/native``) under a name hashed from the
source, compiler, flags and platform, writing a temporary file and renaming it, so processes
building at once do not collide. scripts/setup_env.sh (``make setup``) builds it ahead of time, and
a peer builds it in a worker thread as it starts (``open_peer``), so a compile never holds its event
loop. A library is loaded only from a folder and a file owned by this user that no one else may
write (``check_owned``): anyone who could replace it could run code in every peer on the machine.
The kernel splits large tensors over its own short-lived pthreads (the caller says how many).

Knows nothing of payloads or their validation: the caller passes lengths it has already checked.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_blockwise8.c")
# No -ffast-math or -march: the product must round exactly as numpy's, and the cache may be shared
# by machines with other CPUs. -funroll-loops: ~10% here (gcc 12).
FLAGS = ("-O3", "-funroll-loops", "-std=c99", "-shared", "-fPIC", "-pthread")
COMPILE_TIMEOUT_S = 120.0

_lock = threading.Lock()
_kernel: Callable[..., int] | None = None  # blockwise8_decode, once loaded
_encoder: Callable[..., int] | None = None  # blockwise8_encode, loaded with it
_tried = False  # whether loading (and building when needed) was tried: never twice in a process
_looked = False  # whether the cache was looked at without building


def enabled() -> bool:
    """False when ``SWARM_NODE_NATIVE`` is "0" (or "false", "no", "off")."""
    flag = os.environ.get("SWARM_NODE_NATIVE", "1").strip().lower()
    return flag not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """``$SWARM_CACHE_DIR/native``, else ``~/.cache/swarm-node/native`` (as model/bundled.py)."""
    env = os.environ.get("SWARM_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "swarm-node") / "native"


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "cc")) or ["cc"]


def library_path() -> Path:
    """Where the kernel for this source, compiler, flags and platform lives (built or not)."""
    key = hashlib.sha256(SOURCE.read_bytes())
    for part in (*compiler(), *FLAGS, sys.platform, platform.machine()):
        key.update(b"\0" + part.encode())
    return cache_dir() / f"blockwise8-{key.hexdigest()[:16]}.so"


def decode_kernel(*, build: bool = True) -> Callable[..., int] | None:
    """``blockwise8_decode`` of _blockwise8.c, or None when switched off or unavailable.

    ``build``: compile it when it is not in the cache yet (once per process at most); else only
    load one built earlier, never waiting for a compiler.
    """
    _find(build)
    return _kernel if enabled() else None


def encode_kernel(*, build: bool = True) -> Callable[..., int] | None:
    """``blockwise8_encode`` of _blockwise8.c (same library and rules as ``decode_kernel``).

    It returns 0 where the CPU has no AVX-512F: the caller then encodes with numpy.
    """
    _find(build)
    return _encoder if enabled() else None


def _find(build: bool) -> None:
    global _tried, _looked
    if not enabled() or _tried or (_looked and not build):
        return
    with _lock:
        if not _tried and (build or not _looked):
            _looked = True
            if build or _built():
                _tried = True
                _load()


def _built() -> bool:
    try:
        return library_path().exists()
    except OSError:  # no source file: _load says why
        return True


class UnsafeLibrary(OSError):
    """The kernel's file or folder could be replaced by another user."""


def check_owned(path: Path) -> None:
    """Raise OSError unless ``path`` (not a link) and its folder belong to this user and no one else
    may write them."""
    for item in (path.parent, path):
        info = os.lstat(item)
        if info.st_uid != os.getuid() or info.st_mode & 0o022 or stat.S_ISLNK(info.st_mode):
            raise UnsafeLibrary(
                f"{item} must belong to uid {os.getuid()} and be writable by it alone, "
                f"got uid {info.st_uid}, mode {stat.filemode(info.st_mode)}"
            )


def _load() -> None:
    global _kernel, _encoder
    try:
        path = library_path()
        if not path.exists():
            _build(path)
        check_owned(path)
        library = ctypes.CDLL(str(path))
        kernel, encoder = library.blockwise8_decode, library.blockwise8_encode
    except UnsafeLibrary as exc:
        log.warning("blockwise8: not loading the native kernels, coding with numpy/torch (%s)", exc)
        return
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        log.info("blockwise8: no native kernels, coding with numpy/torch (%s)", exc)
        return
    # (codes, absmax, map, out, numel, block, threads, simd) -> 1 when AVX-512 VBMI ran, see the C
    kernel.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int32] * 2
    kernel.restype = ctypes.c_int
    # (x, absmax, codes, low, threshold, numel, block, threads) -> 1 done, 0 no AVX-512F, -1 NaN/inf
    encoder.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_int32]
    encoder.restype = ctypes.c_int
    log.debug("blockwise8: native kernels %s", path)
    _kernel, _encoder = kernel, encoder


def _build(path: Path) -> None:
    """Compiles SOURCE into ``path``; raises OSError or SubprocessError when it cannot."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [*compiler(), *FLAGS, "-o", tmp, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise subprocess.SubprocessError(
                f"{shlex.join(compiler())} exited with {done.returncode}: "
                f"{done.stderr.strip()[-500:]}"
            )
        os.chmod(tmp, 0o755)  # mkstemp makes it 0600
        os.replace(tmp, path)  # atomic: a concurrent builder's file is just as good
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
