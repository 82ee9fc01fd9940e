"""Small filesystems and kernel knobs for fault tests. Root only (CI runs as root); skipped otherwise."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs / writes /proc/sys: needs root "
                                "(CI runs these as root)")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. '2m') mounted on `path` for the duration; unmounted even on failure."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:   # root without CAP_SYS_ADMIN (an unprivileged container)
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def fill(fs: Path, name: str = "filler", keep: int = 0) -> Path:
    """Fill the filesystem at `fs` with one file until at most `keep` bytes stay free."""
    p = fs / name
    with open(p, "ab") as fh:
        block = b"\0" * 65536
        while True:
            free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
            if free <= keep:
                break
            try:
                fh.write(block[:max(4096, min(len(block), free - keep))])
                fh.flush()
            except OSError:
                break
    return p


@contextlib.contextmanager
def sysctl(path: str, value: str) -> Iterator[None]:
    """Set a /proc/sys knob for the duration and restore it (other processes share it: keep it short)."""
    old = Path(path).read_text()
    try:
        Path(path).write_text(value)
    except OSError as exc:   # /proc/sys read-only (a container)
        pytest.skip(f"cannot set {path}: {exc.strerror}")
    try:
        yield
    finally:
        Path(path).write_text(old)
