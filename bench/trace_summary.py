"""What a step's Chrome trace (bench/step_bench.py --profile-trace) says of the device: how much of
the profiled span the GPU spent in kernels and copies, how much it sat idle between them and
where, and the kernels by their total time.

    python bench/trace_summary.py TRACE.json [--steps N] [--top 30] [--gaps 12]

The profile's operator table (step_bench --profile) sums each name's device time; this reads the
timeline itself, so it also shows the gaps (host work, launches, waits) that no kernel's time
contains. `--steps`: the profiled steps, to print figures per step.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def device_events(trace: dict) -> list[dict]:
    """The trace's device activities (kernels, copies, sets), by start time."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES]
    return sorted(events, key=lambda e: float(e["ts"]))


def summarize(events: list[dict], steps: int = 1, top: int = 30, gaps: int = 12) -> str:
    """The device's busy and idle time over the events' span (any stream: busy where at least one
    activity runs), the largest idle gaps with the activities on either side, and the top
    activities by total time. Times in the trace are microseconds."""
    if not events:
        return "no device activity in the trace"
    busy = 0.0
    idle: list[tuple[float, str, str]] = []
    end, last_name = float(events[0]["ts"]), ""
    for e in events:
        ts, dur = float(e["ts"]), float(e.get("dur", 0.0))
        if ts > end:
            idle.append((ts - end, last_name, e["name"]))
        start = max(ts, end)
        if ts + dur > start:
            busy += ts + dur - start
        if ts + dur >= end:
            end, last_name = ts + dur, e["name"]
    span = end - float(events[0]["ts"])
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        by_name[e["name"]][0] += float(e.get("dur", 0.0))
        by_name[e["name"]][1] += 1
    n = max(steps, 1)
    lines = [f"span {span / 1e3 / n:.3f} ms a step, device busy {busy / 1e3 / n:.3f} ms "
             f"({100 * busy / span:.1f}%), idle {(span - busy) / 1e3 / n:.3f} ms in {len(idle)} gaps "
             f"({len(idle) / n:.0f} a step); {len(events) / n:.0f} activities a step"]
    lines.append("largest gaps (us): after -> before")
    for gap, before, after in sorted(idle, reverse=True)[:gaps]:
        lines.append(f"  {gap:9.1f}  {before[:70]} -> {after[:70]}")
    lines.append("activities by total time, ms a step, calls a step:")
    for name, (total, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {total / 1e3 / n:8.3f} {count / n:7.1f}  {name[:110]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1, help="steps the trace holds (figures are per step)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--gaps", type=int, default=12)
    args = ap.parse_args()
    with open(args.trace) as f:
        trace = json.load(f)
    print(summarize(device_events(trace), args.steps, args.top, args.gaps))


if __name__ == "__main__":
    main()
