"""Is each configured place a place of its own on this filesystem?

The settings compare paths with symlinks resolved; a bind mount (or a second mount of the same
export) is invisible to paths and shows only in the filesystem: the same device and inode. This
check runs at start and in `check-config`. A place that does not exist yet (a destination not
mounted) is compared by the part of its path that exists, and again, per copy, in the local lake
(`LocalLake.replicas` counts one physical file once).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError
from .settings import Settings

Identity = tuple[int, int]   # (st_dev, st_ino)


def _identity(path: str) -> Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _chain(path: Path) -> tuple[Identity | None, set[Identity]]:
    """The identity of `path` itself (None if it does not exist) and of every directory it lies in."""
    p = os.path.realpath(path)
    own = _identity(p)
    around: set[Identity] = set()
    while True:
        ident = _identity(p)
        if ident is not None:
            around.add(ident)
        parent = os.path.dirname(p)
        if parent == p:
            return own, around
        p = parent


def _places(settings: Settings) -> list[tuple[str, Path, bool]]:
    """(key, path, is a destination) of every place the settings name."""
    out = [(f"destinations.{n}.path", d.path, True) for n, d in settings.destinations.items()
           if d.kind == "posix" and d.path is not None]
    out += [(f"rules.{n}.directory", r.directory, False) for n, r in settings.rules.items()]
    out.append(("state_dir", settings.state_dir, False))
    return out


def problems(settings: Settings) -> list[str]:
    """Destinations that are one place with another destination, a watched directory or the state
    directory, or lie inside one (or it inside them), by device and inode."""
    places = [(key, path, dest, *_chain(path)) for key, path, dest in _places(settings)]
    found = []
    for i, (ka, pa, da, own_a, around_a) in enumerate(places):
        for kb, pb, db, own_b, around_b in places[i + 1:]:
            if not (da or db):
                continue   # rules and the state dir among themselves: the settings check them by path
            if own_a is not None and own_a == own_b:
                found.append(f"{kb} = {pb}: the same directory as {ka} = {pa} (same device and inode: a bind "
                             "mount or a symlink?)")
            elif (own_a is not None and own_a in around_b) or (own_b is not None and own_b in around_a):
                found.append(f"{kb} = {pb}: overlaps {ka} = {pa} (one lies inside the other through a bind "
                             "mount or a symlink)")
    return found


def check(settings: Settings) -> None:
    """Raise ConfigError naming every destination that is not a place of its own."""
    found = problems(settings)
    if found:
        raise ConfigError("configured places that are one place on disk (one file there would count as "
                          "two copies, or the agent would take in its own copies):\n  " + "\n  ".join(found))
