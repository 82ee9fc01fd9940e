"""Is each configured place a place of its own on this filesystem?

The settings compare paths with symlinks resolved; a bind mount (or a second mount of the same
export) is invisible to paths and shows only in the filesystem: the same device and inode. This
check runs at start and in `check-config`. A place that does not exist yet (a destination not
mounted) is compared by the part of its path that exists, and again, per copy, in the local lake
(the confirm step, `verify.replicas`, counts one physical file once).

Device and inode see a place and the directories it lies in, never what a bind mount shows: a
destination that is a bind mount of a directory INSIDE the watched tree (or inside another
destination, or the state directory) has an inode of its own. So each place is also mapped, through
/proc/self/mountinfo, to where it lies on its filesystem (device major:minor, and the mount's root
within that filesystem joined with the rest of the path below the mount point), and two places on
one device overlap when one of these physical paths lies inside the other.

Neither sees one filesystem reached through mounts that report different devices (an overlayfs
merged view and its upper directory, two NFS mounts of one export that share no superblock, a bind
mount made after start). So each posix destination's root holds a place token, PLACE_NAME: a
random id, created once and never rewritten. Two destinations showing the same token are one place:
refused at start, and counted once per copy in the local lake (`LocalCatalogue.recorded` names the places, `verify.replicas` counts each once).
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import structlog

from .errors import ConfigError
from .settings import Settings

Identity = tuple[int, int]   # (st_dev, st_ino)
Physical = tuple[str, str]   # (major:minor, the path within that filesystem)

MOUNTINFO = "/proc/self/mountinfo"
PLACE_NAME = ".edge-agent-place"   # in each posix destination's root; carries the agent mark: never data
_TOKEN_MAX = 256

log = structlog.get_logger("edge_agent.places")


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


def _unescape(field: str) -> str:
    """Mount points and roots in mountinfo escape space, tab, newline and backslash as \\ooo."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


_OCTAL = re.compile(r"\\([0-7]{3})")


def _mounts(path: str) -> list[tuple[str, str, str]] | None:
    """(mount point, major:minor, root within the filesystem) of every mount, in mountinfo's order
    (a mount stacked on another comes after it); None if mountinfo cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        log.debug("mountinfo unreadable: bind mounts of subdirectories not checked", path=path,
                  error=exc.strerror)
        return None
    out = []
    for line in lines:
        f = line.split()
        if len(f) >= 5:
            out.append((_unescape(f[4]), f[2], _unescape(f[3])))
    return out


def _inside(path: str, top: str) -> bool:
    """`path` is `top` or lies below it, by whole components (both normalised, absolute)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def _physical(path: Path, mounts: list[tuple[str, str, str]]) -> Physical | None:
    """Where `path` (symlinks resolved, as far as it exists) lies: the device of the mount it is
    under and the mount's root joined with the rest of the path below the mount point."""
    real = os.path.realpath(path)
    best: tuple[str, str, str] | None = None
    for mount in mounts:
        # the longest mount point holding the path; of equal ones the last, which is on top
        if _inside(real, mount[0]) and (best is None or len(mount[0]) >= len(best[0])):
            best = mount
    if best is None:
        return None
    point, dev, root = best
    rest = real[len(point):].lstrip("/")
    return dev, os.path.normpath(os.path.join(root, rest)) if rest else root


def token(root: Path) -> str | None:
    """The place token in destination root `root`, created if it has none (exclusively: a token
    is never overwritten, two agents creating it at once agree on the first). None if it cannot be
    read or created (the root missing, not writable, the file empty or unreadable)."""
    path = os.path.join(root, PLACE_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o444)
    except FileExistsError:
        pass
    except OSError as exc:
        log.warning("destination place token cannot be created", root=str(root), error=exc.strerror)
        return None
    else:
        try:
            os.write(fd, (secrets.token_hex(16) + "\n").encode())
            os.fsync(fd)
        except OSError as exc:
            log.warning("destination place token cannot be written", root=str(root), error=exc.strerror)
            return None
        finally:
            os.close(fd)
        _fsync_dir(root)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            raw = os.read(fd, _TOKEN_MAX)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("destination place token cannot be read", root=str(root), error=exc.strerror)
        return None
    found = raw.decode("ascii", "replace").strip()
    return found or None   # empty: being written by another process, or truncated; not a place yet


def _fsync_dir(root: Path) -> None:
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass   # the token file itself is synced; a lost name is made again, and then differs: safe
    finally:
        os.close(fd)


def _places(settings: Settings) -> list[tuple[str, Path, bool]]:
    """(key, path, is a destination) of every place the settings name."""
    out = [(f"destinations.{n}.path", d.path, True) for n, d in settings.destinations.items()
           if d.kind == "posix" and d.path is not None]
    out += [(f"rules.{n}.directory", r.directory, False) for n, r in settings.rules.items()]
    out.append(("state_dir", settings.state_dir, False))
    return out


def problems(settings: Settings, mountinfo: str = MOUNTINFO) -> list[str]:
    """Destinations that are one place with another destination, a watched directory or the state
    directory, or lie inside one (or it inside them), by device and inode and by where the mounts
    put them on their filesystem."""
    mounts = _mounts(mountinfo)
    places = [(key, path, dest, *_chain(path), _physical(path, mounts) if mounts else None)
              for key, path, dest in _places(settings)]
    # a destination not there (yet) has no token to show: the lake reads it per copy
    tokens = [token(path) if dest and own is not None else None for _, path, dest, own, *_ in places]
    found = []
    for i, (ka, pa, da, own_a, around_a, phys_a) in enumerate(places):
        for j, (kb, pb, db, own_b, around_b, phys_b) in enumerate(places[i + 1:], i + 1):
            if not (da or db):
                continue   # rules and the state dir among themselves: the settings check them by path
            if own_a is not None and own_a == own_b:
                found.append(f"{kb} = {pb}: the same directory as {ka} = {pa} (same device and inode: a bind "
                             "mount or a symlink?)")
            elif (own_a is not None and own_a in around_b) or (own_b is not None and own_b in around_a):
                found.append(f"{kb} = {pb}: overlaps {ka} = {pa} (one lies inside the other through a bind "
                             "mount or a symlink)")
            elif phys_a is not None and phys_b is not None and phys_a[0] == phys_b[0] \
                    and (_inside(phys_a[1], phys_b[1]) or _inside(phys_b[1], phys_a[1])):
                (k1, p1, f1), (k2, p2, f2) = ((kb, pb, phys_b), (ka, pa, phys_a)) if db else \
                    ((ka, pa, phys_a), (kb, pb, phys_b))   # the destination first: it is the one to change
                found.append(f"{k1} = {p1}: overlaps {k2} = {p2} (on device {f1[0]} they are {f1[1]} and "
                             f"{f2[1]}: one lies inside the other through a bind mount)")
            elif tokens[i] is not None and tokens[i] == tokens[j]:
                found.append(f"{kb} = {pb}: the same place as {ka} = {pa} (its {PLACE_NAME} holds the same "
                             "token: one filesystem through two mounts, e.g. an overlay and its upper "
                             "directory, or two mounts of one NFS export)")
    return found


def check(settings: Settings) -> None:
    """Raise ConfigError naming every destination that is not a place of its own."""
    found = problems(settings)
    if found:
        raise ConfigError("configured places that are one place on disk (one file there would count as "
                          "two copies, or the agent would take in its own copies):\n  " + "\n  ".join(found))
