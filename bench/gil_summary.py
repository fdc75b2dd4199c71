"""Summarizes `py-spy record --gil --format raw` output: per thread, the share of samples (each
sample is a moment that thread held the interpreter lock) by leaf function (self) and by
function anywhere on the stack (inclusive). Stacks through the engine factory (start-up:
model build, graph capture) are dropped.

    python bench/gil_summary.py gil_stacks.txt [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

STARTUP = ("build_engine", "capture", "warmup", "selfcheck", "_find_and_load", "load_factory")
FRAME = re.compile(r"^(?P<fn>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _name(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for root in ("site-packages/", "/server/", "/engines/", "/client/"):
        if root in path:
            path = path[path.index(root) + len(root):] if root == "site-packages/" else root.strip("/") + "/" + path.split(root)[-1]
            break
    else:
        path = path.rsplit("/", 1)[-1]
    return f"{m.group('fn')} ({path})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stacks")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    per_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    dropped = 0
    with open(args.stacks, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            frames = stack.split(";")
            if any(s in stack for s in STARTUP):
                dropped += n
                continue
            thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
            body = [fr for fr in frames if not fr.startswith(("thread", "process"))]
            if not body:
                continue
            totals[thread] += n
            per_thread[thread][_name(body[-1])] += n
            for fn in {_name(fr) for fr in body}:
                incl[thread][fn] += n
    grand = sum(totals.values()) or 1
    print(f"# Interpreter-lock samples by thread ({grand} samples kept, {dropped} start-up samples dropped)\n")
    for thread, n in totals.most_common():
        print(f"## {thread}: {n} samples ({100 * n / grand:.1f}% of the lock-held samples)\n")
        print("| self % | function (leaf) |\n|---|---|")
        for fn, k in per_thread[thread].most_common(args.top):
            print(f"| {100 * k / n:.1f} | {fn} |")
        print("\n| inclusive % | function (anywhere on the stack) |\n|---|---|")
        for fn, k in incl[thread].most_common(args.top):
            print(f"| {100 * k / n:.1f} | {fn} |")
        print()


if __name__ == "__main__":
    sys.exit(main())
