"""What a py-spy profile of the agent says, in a few lines: where the sampled time went.

    .venv/bin/python benchmarks/pyspy_top.py PROFILE.txt [--top 15]

PROFILE is py-spy's `--format raw` output (collapsed stacks, one per line, with a count; written
by a benchmark run with EDGE_BENCH_PYSPY=DIR). Prints, per thread kind (hash, transfer, lake, main),
its share of the samples, then the functions with the largest inclusive share (a function counted
once per stack), edge_agent's own and the libraries' alike.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args(argv)
    total = 0
    threads: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    idle = 0
    for line in open(a.profile, errors="replace"):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = re.sub(r"[\s_-]*\d+.*$", "", frames[0].strip('"').split("(")[0]) or frames[0]
        leaf = frames[-1]
        # waiting threads: py-spy samples them too unless --idle is off; count them apart
        if re.search(r"\b(wait|_wait_for_tstate_lock|select|poll|accept|sleep|get|_worker)\b \(", leaf) \
                and "threading.py" in leaf or "queue.py" in leaf or "selectors.py" in leaf:
            idle += n
            continue
        total += n
        threads[thread] += n
        for f in dict.fromkeys(re.sub(r":\d+\)$", ")", x) for x in frames[1:]):
            inclusive[f] += n
    if not total:
        print("no busy samples")
        return 1
    print(f"{total} busy samples ({idle} idle left out)")
    for t, n in threads.most_common(8):
        print(f"  thread {t:<30} {100 * n / total:5.1f} %")
    print("functions (inclusive):")
    for f, n in inclusive.most_common(a.top):
        print(f"  {100 * n / total:5.1f} %  {f[:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
