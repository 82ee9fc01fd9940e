"""Policies as plain functions: naming, retry backoff, confirmation, deletion, bandwidth windows.

Everything here takes its inputs (times, random numbers, observations) as arguments,
so a test states the situation and checks the decision.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import string
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterable, Mapping, Sequence

# ---------------------------------------------------------------- naming

TEMPLATE_FIELDS = {
    "relpath": "path relative to the rule's directory, e.g. run42/f1.fits",
    "reldir": "directory part of relpath ('' at the top)",
    "filename": "file name with extension, e.g. f1.fits",
    "stem": "file name without its last extension, e.g. f1",
    "ext": "last extension without the dot, e.g. fits",
    "night": "observing night YYYYMMDD: the date of (file mtime - night_rollover_hour)",
    "date": "file mtime date YYYYMMDD",
    "year": "file mtime year", "month": "file mtime month", "day": "file mtime day",
    "hour": "file mtime hour", "time": "file mtime HHMMSS",
    "rule": "the rule's name",
}
_FORMATTER = string.Formatter()

# Names a path-like lake accepts (the local lake; Rucio with a path-friendly schema).
# Letters of any script, digits, space and a few safe marks; no control characters, no
# backslash (undecodable bytes are shown as \x escapes and so never pass), at most 250.
PATH_NAME_RE = r"^[\w\-+=:@,~][\w.\-/+=:@,~ ]{0,249}$"
# Rucio's generic schema: no '/' in names, 250 characters at most.
RUCIO_GENERIC_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9.\-_]{1,250}$"
SCOPE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,25}$")


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in _FORMATTER.parse(template) if f]


def check_template(template: str) -> None:
    """Raise ValueError naming any placeholder that does not exist."""
    try:
        fields = template_fields(template)
    except ValueError as exc:
        raise ValueError(f"malformed template: {exc}") from None
    unknown = [f for f in fields if f not in TEMPLATE_FIELDS]
    if unknown:
        raise ValueError(f"unknown placeholder(s) {unknown}; known: {sorted(TEMPLATE_FIELDS)}")


def night_of(mtime: float, rollover_hour: int, tz: dt.tzinfo) -> str:
    """The observing night a file belongs to: a night runs from rollover_hour to rollover_hour."""
    local = dt.datetime.fromtimestamp(mtime, tz) - dt.timedelta(hours=rollover_hour)
    return local.strftime("%Y%m%d")


def naming_fields(relpath: str, mtime: float, rule: str, rollover_hour: int,
                  tz: dt.tzinfo) -> dict[str, str]:
    p = PurePosixPath(relpath)
    t = dt.datetime.fromtimestamp(mtime, tz)
    reldir = str(p.parent) if str(p.parent) != "." else ""
    return {
        "relpath": relpath, "reldir": reldir, "filename": p.name, "stem": p.stem,
        "ext": p.suffix[1:], "night": night_of(mtime, rollover_hour, tz),
        "date": t.strftime("%Y%m%d"), "year": t.strftime("%Y"), "month": t.strftime("%m"),
        "day": t.strftime("%d"), "hour": t.strftime("%H"), "time": t.strftime("%H%M%S"),
        "rule": rule,
    }


def render(template: str, fields: Mapping[str, str]) -> str:
    out = template.format(**fields)
    return re.sub(r"/{2,}", "/", out).strip("/")


def name_problem(name: str, pattern: str = PATH_NAME_RE) -> str | None:
    """Why `name` cannot be a DID name in a lake accepting `pattern`, or None if it can."""
    if not name:
        return "the name is empty"
    if any(seg in ("", ".", "..") for seg in name.split("/")):
        return f"the name {name!r} has an empty, '.' or '..' path segment"
    if not re.fullmatch(pattern, name):
        return f"the name {name!r} does not match the lake's name pattern {pattern!r}"
    return None


def versioned_name(name: str, version: int) -> str:
    """Name of a later version of a file whose earlier version already holds `name` in the lake."""
    return name if version <= 1 else f"{name}.v{version}"


def name_candidates(name: str, version: int, tries: int = 100) -> list[str]:
    """The names a version may take, in order: the rendered one, then versioned ones (the file's
    own version number first, so a rewritten file keeps the name it always had)."""
    out = [name]
    first = max(2, version)
    out += [versioned_name(name, first)]
    out += [versioned_name(name, n) for n in range(2, first + tries) if n != first]
    return out[:tries]


# ---------------------------------------------------------------- retries

def backoff_seconds(attempt: int, base: float, cap: float, jitter: float, rand: float) -> float:
    """Exponential backoff with jitter: base * 2**(attempt-1), capped, spread by +-jitter.

    `rand` is a number in [0, 1) supplied by the caller (a RNG at the edge, a constant in tests).
    """
    raw = min(cap, base * (2 ** max(0, attempt - 1)))
    return max(0.0, raw * (1.0 + jitter * (2.0 * rand - 1.0)))


def longest_backoff(cap: float, jitter: float) -> float:
    """The longest wait backoff_seconds can give: a stored retry time further ahead than this
    was scheduled before the wall clock stepped back (or by a config with a larger cap)."""
    return cap * (1.0 + jitter)


# ---------------------------------------------------------------- confirmation and deletion

@dataclass(frozen=True)
class Replica:
    """What the lake says (and, where the transport could, what was verified) about one copy."""
    location: str            # destination or RSE name
    size: int | None
    adler32: str | None
    available: bool = True   # the lake lists it as usable (Rucio: AVAILABLE)
    url: str = ""
    problem: str | None = None  # what verifying the copy found wrong (e.g. an S3 ETag that is not the MD5)
    # the adler32 is the catalogue's (the agent's own number, registered by it), not one the storage
    # answered: verify_replicas = false, verify_upload = "size" on a storage without checksums, S3
    adler32_from_catalogue: bool = False
    gone: bool = False       # listed, but its storage answered that it holds nothing (not: did not answer)


@dataclass(frozen=True)
class Confirmation:
    """The copies of a file that count toward its N, and those that do not (with why)."""
    good: tuple[Replica, ...]
    bad: tuple[tuple[Replica, str], ...]   # copies that do not count, with why

    @property
    def count(self) -> int:
        return len(self.good)


def normalise_adler32(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v.startswith("0x"):
        v = v[2:]
    return v.zfill(8) if re.fullmatch(r"[0-9a-f]{1,8}", v) else None


def judge_replicas(replicas: Iterable[Replica], size: int, adler32: str,
                   exclude_locations: Sequence[str] = ()) -> Confirmation:
    """Sort the lake's replicas into those that count (available, size and adler32 equal) and not.

    A replica with no checksum does not count: a storage that cannot say what it holds
    is not evidence. Replicas on `exclude_locations` (the buffer itself) never count.
    """
    want = normalise_adler32(adler32)
    good: list[Replica] = []
    bad: list[tuple[Replica, str]] = []
    seen: set[str] = set()
    for r in replicas:
        if r.location in exclude_locations:
            continue
        if r.location in seen:
            bad.append((r, "duplicate location"))
            continue
        if not r.available:
            bad.append((r, "not available yet"))
        elif r.size != size:
            bad.append((r, f"size {r.size} != local {size}"))
        elif r.problem:
            bad.append((r, r.problem))
        elif normalise_adler32(r.adler32) is None:
            bad.append((r, "no adler32 known for this copy"))
        elif normalise_adler32(r.adler32) != want:
            bad.append((r, f"adler32 {r.adler32} != local {want}"))
        else:
            good.append(r)
            seen.add(r.location)
    return Confirmation(tuple(good), tuple(bad))


@dataclass(frozen=True)
class LocalStat:
    """What identifies a local file's version without reading it.

    mtime can be set back by anyone (touch -d) and is coarse on some filesystems (ext3, NFS, FAT):
    a same-size rewrite can keep it. ctime cannot be set by a user and changes with every write,
    so it is compared too, where known: None for a row hashed by an older agent, and for a file
    the agent itself renamed (a rename stamps ctime on ext4, xfs and tmpfs).
    """
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int | None = None
    dev: int | None = None

    def same_file(self, other: LocalStat) -> bool:
        """Is `other` this very version: inode, size and mtime, and ctime and device where both know them."""
        return ((self.inode, self.size, self.mtime_ns) == (other.inode, other.size, other.mtime_ns)
                and _same_if_known(self.ctime_ns, other.ctime_ns) and _same_if_known(self.dev, other.dev))


def _same_if_known(a: int | None, b: int | None) -> bool:
    return a is None or b is None or a == b


def confirmed_since(confirmed_at: float | None, wall_now: float, mono_now: float) -> float:
    """The monotonic time a file's confirmation is taken to have happened, fixed the first time
    this process looks at the file: what the wall clock says has passed since confirmed_at, and
    never less than nothing (a confirmed_at in the future means the clock stepped back).

    From then on the keep period runs on the monotonic clock, so a later wall-clock step,
    forward or back, neither shortens nor stretches it. Only a step while the agent was down
    (between confirmation and this first look) still counts, by its size.
    """
    if confirmed_at is None:
        return mono_now
    return mono_now - max(0.0, wall_now - confirmed_at)


def deletion_verdict(policy: str, keep_hours: float, kept_s: float,
                     confirmation: Confirmation, copies: int, recorded: LocalStat,
                     current: LocalStat | None, dry_run: bool) -> tuple[str, str]:
    """Decide what to do with a confirmed file's local copy (`kept_s`: seconds since it was
    confirmed, on the monotonic clock: see confirmed_since).

    Returns (verdict, why) where verdict is one of:
      "delete" - invariant 1 holds and the policy says now;
      "wait"   - not yet (keep period, or not enough replicas right now);
      "keep"   - the policy never deletes, or dry-run;
      "gone"   - the local file is already gone;
      "changed"- the local file is not the one that was hashed: never delete it.
    """
    if current is None:
        return "gone", "the local file no longer exists"
    if not recorded.same_file(current):
        return "changed", (f"local file changed since hashing: recorded {recorded}, now {current}")
    if confirmation.count < copies:
        return "wait", f"{confirmation.count} of {copies} replicas confirmed"
    if policy == "never":
        return "keep", "deletion policy is 'never'"
    if policy == "keep" and kept_s < keep_hours * 3600:
        return "wait", f"kept until {keep_hours} h after confirmation"
    if dry_run:
        return "keep", "dry-run: would delete"
    return "delete", f"{confirmation.count} of {copies} replicas confirmed"


# ---------------------------------------------------------------- bandwidth windows

@dataclass(frozen=True)
class Window:
    """A daily period with its own bandwidth cap."""
    start: dt.time
    end: dt.time            # may be before start: the window crosses midnight
    bandwidth_mbps: float   # 0 means paused


def in_window(t: dt.time, w: Window) -> bool:
    if w.start <= w.end:
        return w.start <= t < w.end
    return t >= w.start or t < w.end


def bandwidth_cap(now_local: dt.time, default_mbps: float, windows: Sequence[Window]) -> float:
    """Bytes per second allowed now (math.inf = unlimited). The first matching window wins."""
    for w in windows:
        if in_window(now_local, w):
            return w.bandwidth_mbps * 1e6
    return math.inf if default_mbps <= 0 else default_mbps * 1e6


# ---------------------------------------------------------------- disk forecast

def fill_rate(samples: Sequence[tuple[float, int]]) -> float | None:
    """Least-squares slope of used bytes over time (bytes/s); None with fewer than 2 samples."""
    if len(samples) < 2:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mu = sum(u for _, u in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    if var == 0:
        return None
    return sum((t - mt) * (u - mu) for t, u in samples) / var


def seconds_to_full(free_bytes: int, rate: float | None) -> float | None:
    """Time until the disk is full at the current net fill rate; None when it is draining or flat."""
    if rate is None or rate <= 0:
        return None
    return free_bytes / rate


def disk_level(used_fraction: float, warn: float, critical: float,
               eta_s: float | None, warn_eta_s: float) -> str:
    """ok / warning / critical from the watermarks and the time-to-full forecast."""
    if used_fraction >= critical:
        return "critical"
    if used_fraction >= warn or (eta_s is not None and eta_s < warn_eta_s):
        return "warning"
    return "ok"


# ---------------------------------------------------------------- completion

@dataclass(frozen=True)
class Observation:
    """What the edge saw of a candidate file, for the completion policies to judge.

    No wall time and no mtime: how long a file has been quiet is what this process saw on its
    monotonic clock, so a wall-clock step forward cannot make a file still being written look
    quiet, nor a step back hold every file back.
    """
    unchanged_s: float              # monotonic seconds this process has seen inode, size, mtime unchanged
    closed_after_change: bool       # a close-after-write was seen with the file exactly as it is now
    writers: int | None             # processes holding it open for writing; None = cannot tell
    marker: bool
    sidecar: bool | None            # None: no sidecar; False: present but not valid JSON yet


def completion_verdict(policies: Sequence[str], obs: Observation, stable_seconds: float,
                       closed_fallback_seconds: float) -> tuple[bool, str]:
    """(complete?, what it is still waiting for). All policies must agree."""
    waiting: list[str] = []
    quiet = obs.unchanged_s
    for p in policies:
        if p == "closed":
            if obs.writers:
                waiting.append(f"{obs.writers} writer(s) still have it open")
            elif not obs.closed_after_change and obs.writers is None and quiet < closed_fallback_seconds:
                # cannot see other users' open files: wait for the close event, or a long quiet spell
                waiting.append("no close-after-write seen yet")
        elif p == "stable":
            if quiet < stable_seconds:
                waiting.append(f"unchanged for {quiet:.1f}s of {stable_seconds:g}s")
        elif p == "marker":
            if not obs.marker:
                waiting.append("no marker file yet")
        elif p == "sidecar":
            if obs.sidecar is None:
                waiting.append("no sidecar file yet")
            elif obs.sidecar is False:
                waiting.append("sidecar is not a complete JSON object yet")
        elif p == "renamed":
            pass  # names with temporary suffixes never become candidates
        else:
            raise ValueError(f"unknown completion policy {p!r}")
    return (not waiting, "; ".join(waiting))
