"""Policies as plain functions: each test states a situation and checks the decision."""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo

import pytest

from edge_agent.core import policy
from edge_agent.core.policy import (
    PATH_NAME_RE,
    RUCIO_GENERIC_NAME_RE,
    Confirmation,
    LocalStat,
    Observation,
    Replica,
    Window,
)

UTC = dt.UTC


def ts(*args: int, tz: dt.tzinfo = UTC) -> float:
    return dt.datetime(*args, tzinfo=tz).timestamp()


# ================================================================ templates and names

class TestTemplates:
    def test_known_placeholders_pass(self) -> None:
        policy.check_template("{rule}/{night}/{reldir}/{stem}.{ext}")
        policy.check_template("no placeholders at all")

    def test_unknown_placeholder_is_named(self) -> None:
        with pytest.raises(ValueError, match="nigth"):
            policy.check_template("{rule}/{nigth}/{filename}")

    def test_every_unknown_placeholder_is_named(self) -> None:
        with pytest.raises(ValueError) as ei:
            policy.check_template("{foo}/{filename}/{bar}")
        assert "'foo'" in str(ei.value) and "'bar'" in str(ei.value)
        assert "'filename'" in str(ei.value)  # the known ones are listed as help

    def test_malformed_template(self) -> None:
        with pytest.raises(ValueError, match="malformed"):
            policy.check_template("{relpath")

    def test_template_fields(self) -> None:
        assert policy.template_fields("{a}/x/{b}{c}") == ["a", "b", "c"]

    def test_render_collapses_slashes_and_strips(self) -> None:
        fields = {"reldir": "", "filename": "f1.fits", "rule": "magic"}
        assert policy.render("{rule}/{reldir}/{filename}", fields) == "magic/f1.fits"
        assert policy.render("/{reldir}/{filename}/", fields) == "f1.fits"
        assert policy.render("a///b//{filename}", fields) == "a/b/f1.fits"

    def test_naming_fields(self) -> None:
        mtime = ts(2024, 3, 10, 1, 2, 3)
        f = policy.naming_fields("run42/sub/f1.tar.gz", mtime, "magic", 12, UTC)
        assert f == {
            "relpath": "run42/sub/f1.tar.gz", "reldir": "run42/sub", "filename": "f1.tar.gz",
            "stem": "f1.tar", "ext": "gz", "night": "20240309", "date": "20240310", "year": "2024",
            "month": "03", "day": "10", "hour": "01", "time": "010203", "rule": "magic",
        }
        assert set(f) == set(policy.TEMPLATE_FIELDS)

    def test_naming_fields_at_the_top(self) -> None:
        f = policy.naming_fields("f1", ts(2024, 3, 10, 13, 0, 0), "r", 12, UTC)
        assert (f["reldir"], f["stem"], f["ext"], f["night"]) == ("", "f1", "", "20240310")

    def test_render_with_naming_fields(self) -> None:
        f = policy.naming_fields("f1.fits", ts(2024, 3, 10, 1, 0, 0), "magic", 12, UTC)
        assert policy.render("{rule}/{night}/{reldir}/{filename}", f) == "magic/20240309/f1.fits"


class TestNightOf:
    @pytest.mark.parametrize(("when", "night"), [
        ((2024, 3, 10, 11, 59, 59), "20240309"),
        ((2024, 3, 10, 12, 0, 0), "20240310"),
        ((2024, 3, 10, 23, 59, 59), "20240310"),
        ((2024, 3, 11, 0, 0, 0), "20240310"),
        ((2024, 3, 11, 11, 59, 59), "20240310"),
        ((2024, 3, 11, 12, 0, 0), "20240311"),
    ])
    def test_around_the_rollover_hour(self, when: tuple[int, ...], night: str) -> None:
        assert policy.night_of(ts(*when), 12, UTC) == night

    def test_rollover_zero_is_the_calendar_date(self) -> None:
        assert policy.night_of(ts(2024, 3, 10, 0, 0, 0), 0, UTC) == "20240310"
        assert policy.night_of(ts(2024, 3, 9, 23, 59, 59), 0, UTC) == "20240309"

    def test_in_a_non_utc_zone(self) -> None:
        santiago = zoneinfo.ZoneInfo("America/Santiago")  # UTC-3 in January
        t = ts(2024, 1, 15, 13, 0, 0)                     # 10:00 in Santiago: still the night of the 14th
        assert policy.night_of(t, 12, UTC) == "20240115"
        assert policy.night_of(t, 12, santiago) == "20240114"
        assert policy.night_of(ts(2024, 1, 15, 15, 0, 0), 12, santiago) == "20240115"  # 12:00 local

    def test_east_of_utc(self) -> None:
        tokyo = zoneinfo.ZoneInfo("Asia/Tokyo")  # UTC+9
        t = ts(2024, 1, 15, 2, 30, 0)            # 11:30 in Tokyo
        assert policy.night_of(t, 12, tokyo) == "20240114"
        assert policy.night_of(t + 3600, 12, tokyo) == "20240115"


class TestNameProblem:
    @pytest.mark.parametrize("name", ["run42/f1.fits", "a", "A0/b_c-d.e+f=g:h", "x" * 250, "a b",
                                      "é.fits", "_leading", "-leading", "日本/観測.fits"])
    def test_good_path_names(self, name: str) -> None:
        assert policy.name_problem(name) is None

    def test_empty(self) -> None:
        assert "empty" in (policy.name_problem("") or "")

    @pytest.mark.parametrize("name", ["a/../b", "..", "a/./b", "a//b", "/a", "a/", "./a"])
    def test_bad_segments(self, name: str) -> None:
        p = policy.name_problem(name)
        assert p is not None and "segment" in p

    @pytest.mark.parametrize("name", ["f1.fits\n", "a*b", "x" * 251, "a\\b", "bad\\xff.fits", " lead",
                                      "a\tb", "q?.fits"])
    def test_bad_characters_or_length(self, name: str) -> None:
        p = policy.name_problem(name)
        assert p is not None and "pattern" in p

    def test_rucio_generic_has_no_slashes(self) -> None:
        assert policy.name_problem("run42/f1.fits", PATH_NAME_RE) is None
        p = policy.name_problem("run42/f1.fits", RUCIO_GENERIC_NAME_RE)
        assert p is not None and repr(RUCIO_GENERIC_NAME_RE) in p
        assert policy.name_problem("run42.f1.fits", RUCIO_GENERIC_NAME_RE) is None

    def test_rucio_generic_wants_two_characters(self) -> None:
        assert policy.name_problem("a", PATH_NAME_RE) is None
        assert policy.name_problem("a", RUCIO_GENERIC_NAME_RE) is not None
        assert policy.name_problem("ab", RUCIO_GENERIC_NAME_RE) is None

    def test_rucio_generic_rejects_path_only_characters(self) -> None:
        for name in ("a+b", "a=b", "a:b"):
            assert policy.name_problem(name, PATH_NAME_RE) is None
            assert policy.name_problem(name, RUCIO_GENERIC_NAME_RE) is not None

    def test_scope_re(self) -> None:
        assert policy.SCOPE_RE.match("user.jdoe")
        assert not policy.SCOPE_RE.match("x" * 26)
        assert not policy.SCOPE_RE.match("a/b")

    def test_versioned_name(self) -> None:
        assert policy.versioned_name("f1.fits", 1) == "f1.fits"
        assert policy.versioned_name("f1.fits", 0) == "f1.fits"
        assert policy.versioned_name("f1.fits", 3) == "f1.fits.v3"


# ================================================================ backoff

class TestBackoff:
    def test_doubles_without_jitter(self) -> None:
        got = [policy.backoff_seconds(a, 10, 1e9, 0.0, 0.7) for a in range(1, 6)]
        assert got == [10, 20, 40, 80, 160]

    def test_attempt_zero_is_the_base(self) -> None:
        assert policy.backoff_seconds(0, 10, 100, 0.0, 0.0) == 10

    def test_capped(self) -> None:
        assert policy.backoff_seconds(5, 10, 100, 0.0, 0.5) == 100
        assert policy.backoff_seconds(60, 10, 100, 0.0, 0.5) == 100  # no overflow in a long outage

    def test_jitter_is_centred(self) -> None:
        assert policy.backoff_seconds(3, 10, 1000, 0.2, 0.5) == pytest.approx(40)

    @pytest.mark.parametrize("attempt", [1, 2, 4, 10, 30])
    def test_jitter_bounds(self, attempt: int) -> None:
        raw = min(300.0, 10 * 2 ** (attempt - 1))
        values = [policy.backoff_seconds(attempt, 10, 300, 0.25, r / 100) for r in range(100)]
        assert all(0.75 * raw - 1e-9 <= v <= 1.25 * raw + 1e-9 for v in values)
        assert min(values) == pytest.approx(0.75 * raw)
        assert max(values) > 1.24 * raw

    def test_full_jitter_never_negative(self) -> None:
        assert policy.backoff_seconds(1, 10, 100, 1.0, 0.0) == 0.0

    @pytest.mark.parametrize("jitter", [0.0, 0.25, 1.0])
    def test_longest_backoff_bounds_every_backoff(self, jitter: float) -> None:
        longest = policy.longest_backoff(300, jitter)
        assert all(policy.backoff_seconds(a, 10, 300, jitter, r / 100) <= longest
                   for a in range(1, 40) for r in range(100))
        assert policy.backoff_seconds(40, 10, 300, jitter, 0.999999) == pytest.approx(longest)


# ================================================================ replicas

def rep(loc: str = "a", size: int | None = 100, adler: str | None = "0a1b2c3d", available: bool = True
        ) -> Replica:
    return Replica(loc, size, adler, available, f"file:///{loc}/x")


class TestJudgeReplicas:
    def test_good_ones_count(self) -> None:
        c = policy.judge_replicas([rep("a"), rep("b")], 100, "0a1b2c3d")
        assert c.count == 2 and not c.bad
        assert [r.location for r in c.good] == ["a", "b"]

    def test_wrong_size(self) -> None:
        c = policy.judge_replicas([rep("a", size=99)], 100, "0a1b2c3d")
        assert c.count == 0
        assert c.bad[0][1] == "size 99 != local 100"

    def test_unknown_size(self) -> None:
        c = policy.judge_replicas([rep("a", size=None)], 100, "0a1b2c3d")
        assert c.count == 0 and "size None" in c.bad[0][1]

    def test_wrong_adler32(self) -> None:
        c = policy.judge_replicas([rep("a", adler="deadbeef")], 100, "0a1b2c3d")
        assert c.count == 0 and "adler32 deadbeef != local 0a1b2c3d" == c.bad[0][1]

    @pytest.mark.parametrize("adler", [None, "", "not-hex", "123456789"])
    def test_missing_checksum_is_no_evidence(self, adler: str | None) -> None:
        c = policy.judge_replicas([rep("a", adler=adler)], 100, "0a1b2c3d")
        assert c.count == 0 and "no adler32" in c.bad[0][1]

    def test_not_available(self) -> None:
        c = policy.judge_replicas([rep("a", available=False)], 100, "0a1b2c3d")
        assert c.count == 0 and c.bad[0][1] == "not available yet"

    def test_duplicate_location_counts_once(self) -> None:
        c = policy.judge_replicas([rep("a"), rep("a"), rep("b")], 100, "0a1b2c3d")
        assert c.count == 2
        assert [(r.location, why) for r, why in c.bad] == [("a", "duplicate location")]

    def test_bad_then_good_at_one_location(self) -> None:
        c = policy.judge_replicas([rep("a", adler="ffffffff"), rep("a")], 100, "0a1b2c3d")
        assert c.count == 1 and len(c.bad) == 1

    def test_excluded_locations_neither_count_nor_complain(self) -> None:
        c = policy.judge_replicas([rep("buffer"), rep("a")], 100, "0a1b2c3d", exclude_locations=("buffer",))
        assert [r.location for r in c.good] == ["a"] and not c.bad

    @pytest.mark.parametrize(("remote", "local"), [
        ("0x0a1b2c3d", "0a1b2c3d"), ("A1B2C3D", "0a1b2c3d"), ("a1b2c3d", "0x0A1B2C3D"),
        (" 0A1B2C3D ", "a1b2c3d"), ("1", "00000001"), ("0X1", "1"),
    ])
    def test_adler32_normalisation(self, remote: str, local: str) -> None:
        assert policy.judge_replicas([rep("a", adler=remote)], 100, local).count == 1

    def test_normalise_adler32(self) -> None:
        assert policy.normalise_adler32("0xABC") == "00000abc"
        assert policy.normalise_adler32(None) is None
        assert policy.normalise_adler32("0x") is None
        assert policy.normalise_adler32("g0000000") is None

    def test_a_wrong_local_checksum_matches_nothing(self) -> None:
        # a lake copy is never confirmed against garbage
        assert policy.judge_replicas([rep("a", adler="0")], 100, "zzz").count == 0


# ================================================================ deletion

REC = LocalStat(inode=7, size=100, mtime_ns=123)


def conf(n: int) -> Confirmation:
    return Confirmation(tuple(rep(f"d{i}") for i in range(n)), ())


def verdict(policy_name: str = "after_confirm", keep_hours: float = 0.0, kept: float = 0.0,
            n: int = 2, copies: int = 2, current: LocalStat | None = REC, dry_run: bool = False) -> str:
    v, why = policy.deletion_verdict(policy_name, keep_hours, kept, conf(n), copies, REC, current, dry_run)
    assert why  # every verdict says why
    return v


class TestDeletionVerdict:
    def test_delete(self) -> None:
        assert verdict() == "delete"
        assert verdict(n=3) == "delete"

    def test_wait_for_replicas(self) -> None:
        v, why = policy.deletion_verdict("after_confirm", 0, 0, conf(1), 2, REC, REC, False)
        assert v == "wait" and "1 of 2" in why

    def test_keep_hours(self) -> None:
        assert verdict("keep", keep_hours=2, kept=0) == "wait"
        assert verdict("keep", keep_hours=2, kept=7199) == "wait"
        assert verdict("keep", keep_hours=2, kept=7200) == "delete"

    def test_confirmed_since_is_fixed_by_the_wall_clock_once_then_runs_on_the_monotonic_one(self) -> None:
        # first look 100 s after confirmation by the wall clock, at monotonic 5000
        assert policy.confirmed_since(1000.0, 1100.0, 5000.0) == 4900.0
        # a confirmed_at in the future (the clock stepped back since): nothing has passed, not less
        assert policy.confirmed_since(1000.0, 1000.0 - 3 * 3600, 5000.0) == 5000.0
        assert policy.confirmed_since(None, 1100.0, 5000.0) == 5000.0

    def test_never(self) -> None:
        assert verdict("never", kept=1e12) == "keep"

    def test_dry_run(self) -> None:
        v, why = policy.deletion_verdict("after_confirm", 0, 0, conf(2), 2, REC, REC, True)
        assert v == "keep" and "dry-run" in why
        assert verdict("keep", keep_hours=1, kept=3600, dry_run=True) == "keep"

    def test_gone(self) -> None:
        assert verdict(current=None) == "gone"
        assert verdict(current=None, n=0) == "gone"

    @pytest.mark.parametrize("current", [LocalStat(8, 100, 123), LocalStat(7, 101, 123), LocalStat(7, 100, 124)])
    def test_changed_wins_over_everything(self, current: LocalStat) -> None:
        assert verdict(current=current) == "changed"
        assert verdict(current=current, n=0) == "changed"
        assert verdict("never", current=current) == "changed"

    def test_a_rewrite_that_kept_size_and_mtime_is_changed_by_its_ctime(self) -> None:
        hashed = LocalStat(7, 100, 123, ctime_ns=500, dev=3)
        for current in (LocalStat(7, 100, 123, ctime_ns=501, dev=3), LocalStat(7, 100, 123, ctime_ns=500, dev=4)):
            v, _ = policy.deletion_verdict("after_confirm", 0, 0, conf(2), 2, hashed, current, False)
            assert v == "changed"
        v, _ = policy.deletion_verdict("after_confirm", 0, 0, conf(2), 2, hashed, hashed, False)
        assert v == "delete"

    def test_a_row_hashed_without_ctime_is_judged_by_inode_size_mtime(self) -> None:
        older = LocalStat(7, 100, 123)                 # an older agent recorded neither ctime nor device
        now = LocalStat(7, 100, 123, ctime_ns=501, dev=3)
        assert policy.deletion_verdict("after_confirm", 0, 0, conf(2), 2, older, now, False)[0] == "delete"

    def test_not_enough_replicas_wins_over_policy(self) -> None:
        assert verdict("keep", keep_hours=0, n=1) == "wait"
        assert verdict("never", n=1) == "wait"


# ================================================================ bandwidth windows

NIGHT = Window(dt.time(20, 0), dt.time(6, 0), 0.0)      # telescope observes: paused
DAY = Window(dt.time(9, 0), dt.time(17, 0), 50.0)


class TestBandwidth:
    @pytest.mark.parametrize(("t", "inside"), [
        (dt.time(20, 0), True), (dt.time(23, 59, 59), True), (dt.time(0, 0), True), (dt.time(5, 59, 59), True),
        (dt.time(6, 0), False), (dt.time(19, 59, 59), False), (dt.time(12, 0), False),
    ])
    def test_window_crossing_midnight(self, t: dt.time, inside: bool) -> None:
        assert policy.in_window(t, NIGHT) is inside

    @pytest.mark.parametrize(("t", "inside"), [
        (dt.time(9, 0), True), (dt.time(16, 59, 59), True), (dt.time(17, 0), False), (dt.time(8, 59), False),
    ])
    def test_window_within_a_day(self, t: dt.time, inside: bool) -> None:
        assert policy.in_window(t, DAY) is inside

    def test_zero_pauses(self) -> None:
        assert policy.bandwidth_cap(dt.time(1, 0), 100, [NIGHT, DAY]) == 0.0

    def test_window_cap_in_bytes_per_second(self) -> None:
        assert policy.bandwidth_cap(dt.time(10, 0), 100, [NIGHT, DAY]) == 50e6

    def test_outside_windows_the_default(self) -> None:
        assert policy.bandwidth_cap(dt.time(18, 0), 100, [NIGHT, DAY]) == 100e6
        assert policy.bandwidth_cap(dt.time(18, 0), 0, [NIGHT, DAY]) == math.inf

    def test_first_matching_window_wins(self) -> None:
        w1 = Window(dt.time(0, 0), dt.time(12, 0), 5.0)
        w2 = Window(dt.time(6, 0), dt.time(18, 0), 7.0)
        assert policy.bandwidth_cap(dt.time(8, 0), 0, [w1, w2]) == 5e6
        assert policy.bandwidth_cap(dt.time(8, 0), 0, [w2, w1]) == 7e6


# ================================================================ disk forecast

class TestDisk:
    def test_fill_rate_is_the_slope(self) -> None:
        samples = [(float(t), 1000 + 50 * t) for t in range(10)]
        assert policy.fill_rate(samples) == pytest.approx(50.0)

    def test_fill_rate_least_squares(self) -> None:
        assert policy.fill_rate([(0, 0), (1, 10), (2, 0)]) == pytest.approx(0.0)
        assert policy.fill_rate([(0, 100), (10, 0)]) == pytest.approx(-10.0)

    def test_fill_rate_needs_two_distinct_times(self) -> None:
        assert policy.fill_rate([]) is None
        assert policy.fill_rate([(1.0, 5)]) is None
        assert policy.fill_rate([(1.0, 5), (1.0, 9)]) is None

    def test_seconds_to_full(self) -> None:
        assert policy.seconds_to_full(1000, 10.0) == 100.0
        assert policy.seconds_to_full(1000, 0.0) is None
        assert policy.seconds_to_full(1000, -5.0) is None
        assert policy.seconds_to_full(1000, None) is None

    @pytest.mark.parametrize(("used", "eta", "level"), [
        (0.50, None, "ok"), (0.79, 1e9, "ok"), (0.80, None, "warning"), (0.89, None, "warning"),
        (0.90, None, "critical"), (0.99, 1.0, "critical"), (0.10, 3599.0, "warning"), (0.10, 3600.0, "ok"),
    ])
    def test_disk_level(self, used: float, eta: float | None, level: str) -> None:
        assert policy.disk_level(used, 0.8, 0.9, eta, 3600.0) == level


# ================================================================ completion

def obs(**kw: object) -> Observation:
    base: dict[str, object] = {"unchanged_s": 100.0, "closed_after_change": False, "writers": None,
                               "marker": False, "sidecar": None}
    base.update(kw)
    return Observation(**base)  # type: ignore[arg-type]


def done(policies: list[str], o: Observation, stable: float = 5.0, fallback: float = 300.0) -> bool:
    ok, why = policy.completion_verdict(policies, o, stable, fallback)
    assert ok is (why == "")
    return ok


class TestCompletion:
    def test_closed_with_writers_waits(self) -> None:
        ok, why = policy.completion_verdict(["closed"], obs(writers=2, closed_after_change=True), 5, 300)
        assert not ok and "2 writer(s)" in why

    def test_closed_with_no_writers_seen(self) -> None:
        assert done(["closed"], obs(writers=0, unchanged_s=1.0))

    def test_a_close_seen_with_the_file_as_it_is_now(self) -> None:
        assert done(["closed"], obs(closed_after_change=True, unchanged_s=0.0))

    def test_no_close_seen_waits(self) -> None:
        ok, why = policy.completion_verdict(["closed"], obs(unchanged_s=1.0), 5, 300)
        assert not ok and "close-after-write" in why

    def test_closed_fallback_after_a_quiet_period(self) -> None:
        assert not done(["closed"], obs(unchanged_s=299.0))
        assert done(["closed"], obs(unchanged_s=300.0))

    def test_stable(self) -> None:
        assert not done(["stable"], obs(unchanged_s=4.9))
        assert done(["stable"], obs(unchanged_s=5.0))

    def test_stable_reports_progress(self) -> None:
        _, why = policy.completion_verdict(["stable"], obs(unchanged_s=2.0), 5.0, 300)
        assert why == "unchanged for 2.0s of 5s"

    def test_marker(self) -> None:
        assert not done(["marker"], obs(marker=False))
        assert done(["marker"], obs(marker=True, unchanged_s=0.0))

    def test_sidecar(self) -> None:
        _, why = policy.completion_verdict(["sidecar"], obs(sidecar=None), 5, 300)
        assert "no sidecar" in why
        ok, why = policy.completion_verdict(["sidecar"], obs(sidecar=False), 5, 300)
        assert not ok and "not a complete JSON" in why
        assert done(["sidecar"], obs(sidecar=True))

    def test_renamed_alone_is_complete(self) -> None:
        assert done(["renamed"], obs(unchanged_s=0.0))

    def test_all_policies_must_agree(self) -> None:
        both = ["closed", "stable"]
        assert not done(both, obs(closed_after_change=True, unchanged_s=1.0))   # closed, not yet stable
        assert not done(both, obs(writers=1, unchanged_s=1100.0))              # stable, still open
        assert done(both, obs(closed_after_change=True, unchanged_s=5.0))
        ok, why = policy.completion_verdict(["closed", "stable", "marker"], obs(writers=1, unchanged_s=1.0), 5, 300)
        assert not ok and why.count(";") == 2

    def test_marker_and_stable(self) -> None:
        assert not done(["marker", "stable"], obs(marker=True, unchanged_s=1.0))
        assert not done(["marker", "stable"], obs(marker=False, unchanged_s=1100.0))
        assert done(["marker", "stable"], obs(marker=True, unchanged_s=1100.0))

    def test_unknown_policy(self) -> None:
        with pytest.raises(ValueError, match="unknown completion policy 'size'"):
            policy.completion_verdict(["size"], obs(), 5, 300)
