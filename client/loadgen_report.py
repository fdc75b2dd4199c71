"""Merging the workers' measurements into one report per level, the terminal table, the plot,
and the server's Prometheus metrics as deltas over a level (where the server's time went)."""

from __future__ import annotations

import collections
import math
import os
import re
import time
import urllib.request

import numpy as np

from client.loadgen_run import ShareResult

PCTS = (50, 90, 95, 99)


def dist(values, pcts=PCTS) -> dict:
    """count, mean, max and percentiles (None when empty), in the values' unit."""
    a = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if a.size == 0:
        return {"count": 0, **{f"p{p}": None for p in pcts}, "mean": None, "min": None, "max": None}
    q = np.percentile(a, pcts)
    return {"count": int(a.size), **{f"p{p}": round(float(v), 3) for p, v in zip(pcts, q)},
            "mean": round(float(a.mean()), 3), "min": round(float(a.min()), 3), "max": round(float(a.max()), 3)}


def merge_level(concurrency: int, shares: list[ShareResult], *, realtime: bool, chunk_ms: float,
                lag_threshold_ms: float, cpu_threshold: float = 0.9) -> dict:
    streams = sorted((s for sh in shares for s in sh.streams), key=lambda s: s.index)
    ok = [s for s in streams if s.code == "OK"]
    errors = collections.Counter(s.code for s in streams if s.code != "OK")
    error_examples = {}
    for s in streams:
        if s.code != "OK" and s.code not in error_examples:
            error_examples[s.code] = s.detail
    anomalies = [f"stream {s.index}: {a}" for s in streams for a in s.anomalies]
    lat = [v for sh in shares for v in sh.chunk_latency_ms]
    active = [sh for sh in shares if sh.streams] or shares
    wall = max((sh.last_end_wall for sh in active), default=0.0) - min((sh.first_start_wall for sh in active), default=0.0)
    audio_ok = sum(s.audio_s for s in ok)
    lag = [v for sh in shares for v in sh.loop_lag_ms]
    late = [v for sh in shares for v in sh.wake_late_ms]
    writes = [v for sh in shares for v in sh.write_ms]
    cpu = [round(sh.cpu_s / sh.wall_s, 3) if sh.wall_s > 0 else 0.0 for sh in shares]
    lag_d, late_d = dist(lag, (50, 99)), dist(late, (50, 95, 99))
    reasons = []
    if lag_d["p99"] is not None and lag_d["p99"] > lag_threshold_ms:
        reasons.append(f"event-loop lag p99 {lag_d['p99']:.1f} ms > {lag_threshold_ms:g} ms")
    if realtime and late_d["p95"] is not None and late_d["p95"] > lag_threshold_ms:
        reasons.append(f"send lateness p95 {late_d['p95']:.1f} ms > {lag_threshold_ms:g} ms")
    busy = [c for c in cpu if c > cpu_threshold]
    if busy:
        reasons.append(f"{len(busy)} of {len(cpu)} worker(s) busy {max(busy):.0%} of a core")
    return {
        "concurrency": concurrency,
        "streams_requested": concurrency,
        "streams_completed": len(ok),
        "errors": dict(sorted(errors.items())),
        "error_examples": error_examples,
        "chunk_latency_ms": dist(lat),
        "response_latency_ms": dist([v for sh in shares for v in sh.response_latency_ms]),
        "response_latency_negative": sum(sh.response_latency_negative for sh in shares),
        "first_partial_ms": dist([s.first_partial_ms for s in ok]),
        "first_text_ms": dist([s.first_text_ms for s in ok]),
        "final_latency_ms": dist([s.final_ms for s in ok]),
        "rtf": dist([s.wall_s / s.audio_s for s in ok if s.wall_s is not None and s.audio_s > 0], (50, 95)),
        "throughput": {"audio_s": round(audio_ok, 3), "wall_s": round(wall, 3),
                       "rtfx": round(audio_ok / wall, 2) if wall > 0 else None},
        **({"utterances": _utterances(shares, streams, ok)} if any(s.utterances for s in streams) else {}),
        "messages_uncovered": sum(s.uncovered for s in streams),
        "anomalies": anomalies[:20],
        "anomaly_count": len(anomalies),
        "loadgen": {
            "workers": len(shares), "pids": [sh.pid for sh in shares], "cpu_util": cpu,
            "loop_lag_ms": lag_d, "send_lateness_ms": late_d if realtime else None,
            "write_ms": dist(writes, (50, 99)),
            "bottleneck": bool(reasons), "bottleneck_reasons": reasons,
        },
        "_streams": streams,  # dropped before JSON; kept for the transcript dump
    }


def _utterances(shares: list[ShareResult], streams: list, ok: list) -> dict:
    """Calls of several utterances: time to final, EOU to final, finals per stream, misses."""
    reasons: collections.Counter = collections.Counter()
    for s in streams:
        reasons.update(s.end_reasons)
    return {
        "time_to_final_ms": dist([v for sh in shares for v in sh.time_to_final_ms]),
        "eou_to_final_ms": dist([v for sh in shares for v in sh.eou_to_final_ms]),
        "sent": sum(s.utterances for s in streams),
        "with_final": sum(s.utterances - s.missed for s in streams),
        "missed": sum(s.missed for s in streams),
        "missed_in_completed_streams": sum(s.missed for s in ok),
        "extra_finals": sum(s.extra_finals for s in streams),
        "eou_preempted": sum(s.eou_preempted for s in streams),
        "finals_per_stream": dist([s.finals for s in ok], (50,)),
        "end_reasons": dict(sorted(reasons.items())),
    }


def utterance_row(level: dict) -> str:
    """The second line of a level with calls: time to final and client EOU to final."""
    u = level["utterances"]
    t, e = u["time_to_final_ms"], u["eou_to_final_ms"]
    line = (f"{'':>6} utterances {u['with_final']}/{u['sent']} with a final ({u['missed']} missed, "
            f"{u['extra_finals']} extra); time to final p50/p90/p95/p99 {_f(t['p50'])}/{_f(t['p90'])}/"
            f"{_f(t['p95'])}/{_f(t['p99'])} ms")
    if e["count"]:
        line += f"; EOU to final p50/p90/p95/p99 {_f(e['p50'])}/{_f(e['p90'])}/{_f(e['p95'])}/{_f(e['p99'])} ms"
    if u["eou_preempted"]:
        line += f" ({u['eou_preempted']} closed before the EOU)"
    reasons = ", ".join(f"{k or '?'} {v}" for k, v in u["end_reasons"].items())
    return line + (f"; closed by: {reasons}" if reasons else "")


METRICS = {"chunk": "chunk_latency_ms", "response": "response_latency_ms"}


def level_passes(level: dict, target_ms: float, metric: str = "chunk") -> bool:
    """Zero errors, every stream completed, and the metric's p95 at most target_ms."""
    p95 = level[METRICS[metric]]["p95"]
    return (not level["errors"] and level["streams_completed"] == level["streams_requested"]
            and p95 is not None and p95 <= target_ms)


# -- terminal table -----------------------------------------------------------------------------
_COLUMNS = [("conc", 6), ("done", 11), ("errors", 12), ("p50", 7), ("p90", 7), ("p95", 7), ("p99", 7),
            ("resp50", 7), ("resp95", 7), ("1st-prt", 7), ("final50", 7), ("final95", 7), ("RTFx", 7),
            ("lg-lag99", 8), ("note", 0)]


def table_header() -> str:
    top = ("latencies in ms: chunk p50/p90/p95/p99 (message sent -> first response covering it), response "
           "p50/p95 (audio complete -> response), first partial p50, final p50/p95; RTFx = audio s / wall s")
    cols = " ".join(f"{name:>{w}}" if w else name for name, w in _COLUMNS)
    return f"{top}\n{cols}\n{'-' * len(cols)}"


def _f(v, nd=1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def table_row(level: dict, target_ms: float | None = None, metric: str = "chunk") -> str:
    c, fp, fl = level["chunk_latency_ms"], level["first_partial_ms"], level["final_latency_ms"]
    errs = ",".join(f"{k[:10]}:{v}" for k, v in level["errors"].items()) or "0"
    notes = []
    if target_ms is not None:
        notes.append("PASS" if level_passes(level, target_ms, metric) else "FAIL")
    if level["loadgen"]["bottleneck"]:
        notes.append("LOADGEN-BOUND")
    if level["anomaly_count"]:
        notes.append(f"{level['anomaly_count']} anomalies")
    vals = [str(level["concurrency"]), f"{level['streams_completed']}/{level['streams_requested']}", errs,
            _f(c["p50"]), _f(c["p90"]), _f(c["p95"]), _f(c["p99"]), _f(level["response_latency_ms"]["p50"]),
            _f(level["response_latency_ms"]["p95"]), _f(fp["p50"]), _f(fl["p50"]), _f(fl["p95"]),
            _f(level["throughput"]["rtfx"]), _f(level["loadgen"]["loop_lag_ms"]["p99"]), " ".join(notes)]
    return " ".join(f"{v:>{w}}" if w else v for v, (_, w) in zip(vals, _COLUMNS))


def progress_bar(concurrency: int, done: int, errors: int, elapsed: float, width: int = 30) -> str:
    frac = done / concurrency if concurrency else 1.0
    fill = int(round(frac * width))
    return (f"\r  c={concurrency:<6d} [{'#' * fill}{'.' * (width - fill)}] {done}/{concurrency} streams done, "
            f"{errors} errors, {elapsed:5.1f} s ")


# -- plot ---------------------------------------------------------------------------------------
def write_plot(levels: list[dict], path: str, title: str, target_ms: float | None = None) -> str | None:
    """A PNG of latency against concurrency; returns why not when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return "matplotlib is not installed: no plot written (pip install matplotlib)"
    levels = sorted(levels, key=lambda lv: lv["concurrency"])
    xs = [lv["concurrency"] for lv in levels]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label, style in (("p50", "chunk p50", "o-"), ("p95", "chunk p95", "s-"), ("p99", "chunk p99", "^--")):
        ax.plot(xs, [lv["chunk_latency_ms"][key] or math.nan for lv in levels], style, label=label)
    ax.plot(xs, [lv["response_latency_ms"]["p95"] or math.nan for lv in levels], "v-", label="response p95")
    ax.plot(xs, [lv["final_latency_ms"]["p95"] or math.nan for lv in levels], "x:", label="final p95")
    server = [(lv.get("server_metrics") or {}).get("server_chunk_latency_ms_p50") for lv in levels]
    if any(v is not None for v in server):
        ax.plot(xs, [math.nan if v is None else v for v in server], "d-.", alpha=0.7,
                label="server-side chunk p50 (metrics)")
    if target_ms:
        ax.axhline(target_ms, color="red", lw=1, ls="--", label=f"target {target_ms:g} ms")
    bad = [lv for lv in levels if lv["errors"]]
    if bad:
        ax.plot([lv["concurrency"] for lv in bad], [lv["chunk_latency_ms"]["p95"] or 0 for lv in bad], "rX",
                ms=10, label="errors")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("latency vs concurrency")
    ax2.plot(xs, [lv["throughput"]["rtfx"] or 0 for lv in levels], "o-", label="throughput RTFx (audio s / wall s)")
    ax2.plot(xs, [lv["streams_completed"] for lv in levels], "s--", label="streams completed")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("concurrent streams")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    ax2.set_title("throughput")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for a in (ax, ax2):
        a.xaxis.set_major_locator(FixedLocator(xs))
        a.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        for axis in (a.xaxis, a.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -- server metrics (Prometheus text format) -----------------------------------------------------
_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(url: str, timeout: float = 10.0) -> dict[tuple[str, tuple], float]:
    """{(name, ((label, value), ...)): value} from a Prometheus text endpoint."""
    return parse_metrics(urllib.request.urlopen(url, timeout=timeout).read().decode())


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """{(name, ((label, value), ...)): value} from Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        try:
            out[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return out


def _delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def _hist_quantile(before: dict, after: dict, name: str, q: float) -> float | None:
    """A quantile from the delta of a histogram's cumulative buckets (linear within a bucket)."""
    buckets = []
    for (n, labels), v in after.items():
        if n == f"{name}_bucket":
            le = dict(labels).get("le")
            buckets.append((math.inf if le == "+Inf" else float(le), v - before.get((n, labels), 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    total, rank = buckets[-1][1], q * buckets[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank and total > 0:
            if math.isinf(le):
                return prev_le
            width = c - prev_c
            return prev_le + (le - prev_le) * ((rank - prev_c) / width if width > 0 else 1.0)
        prev_le, prev_c = le, c
    return prev_le


STEP_PHASE_ORDER = ("assemble", "features", "gather", "encoder", "decode", "commit", "results")  # server.ops.metrics
WORKER_PARTS = ("to_worker", "worker_before", "worker_after", "from_worker", "unpack")  # server.ops.metrics


def _label_means_ms(before: dict, after: dict, name: str, label: str, values: tuple[str, ...]) -> tuple[dict, int]:
    """Per label value of a labelled histogram, its mean in ms over the level (values with no
    observations left out), and the most observations any value had."""
    means, most = {}, 0
    for value in values:
        count = _delta(before, after, f"{name}_count", **{label: value})
        if count > 0:
            most = max(most, int(count))
            means[value] = round(1e3 * _delta(before, after, f"{name}_sum", **{label: value}) / count, 3)
    return means, most


def server_delta(before: dict, after: dict, wall_s: float) -> dict:
    """What the server's own metrics say about one level."""
    def mean(name: str, scale: float = 1.0):
        c = _delta(before, after, f"{name}_count")
        return round(scale * _delta(before, after, f"{name}_sum") / c, 3) if c > 0 else None

    steps = _delta(before, after, "asr_step_seconds_count")
    engines = {}
    for (n, labels), v in after.items():
        if n == "asr_steps_total":
            d = v - before.get((n, labels), 0.0)
            if d:
                engines[dict(labels).get("engine", "?")] = int(d)
    executions = {}
    for (n, labels), v in after.items():
        if n in ("asr_engine_executions_total", "asr_engine_executions"):
            d = v - before.get((n, labels), 0.0)
            if d:
                executions[dict(labels).get("engine", "?")] = int(d)
    faults = {}
    for (n, labels), v in after.items():
        if n in ("asr_errors_total", "asr_step_faults_total", "asr_refused_total"):
            d = v - before.get((n, labels), 0.0)
            if d:
                faults[n[4:-6] + "{" + ",".join(f"{k}={val}" for k, val in labels) + "}"] = int(d)
    # Phases of the steps that synchronized the device at each boundary (a sample of the steps),
    # in the order a step runs them; the way to the engine worker and back, by part.
    phases, phase_samples = _label_means_ms(before, after, "asr_engine_phase_seconds", "phase", STEP_PHASE_ORDER)
    worker, _ = _label_means_ms(before, after, "asr_engine_worker_seconds", "part", WORKER_PARTS)
    q = lambda name, p: (None if (v := _hist_quantile(before, after, name, p)) is None else round(1e3 * v, 2))  # noqa: E731
    # garbage collections during the level: every thread stops for them (asr_gc_pause_seconds)
    # (with --frontends: per process too; the engine process's pauses stop the engine thread)
    gc_pause_s, gc_full = 0.0, 0
    gc_by_process: dict[str, dict] = {}
    longest: dict[str, dict[float, int]] = {}  # process -> bucket edge -> pauses at most that long
    for (n, labels), v in after.items():
        if not n.startswith("asr_gc_pause_seconds_"):
            continue
        lab = dict(labels)
        process, generation = lab.get("process", "server"), lab.get("generation", "?")
        d = v - before.get((n, labels), 0.0)
        entry = gc_by_process.setdefault(process, {"ms": 0.0, "full": 0, "by_generation": {}})
        gen = entry["by_generation"].setdefault(generation, {"ms": 0.0, "count": 0})
        if n == "asr_gc_pause_seconds_sum":
            gc_pause_s += d
            entry["ms"] = round(entry["ms"] + 1e3 * d, 1)
            gen["ms"] = round(gen["ms"] + 1e3 * d, 1)
        elif n == "asr_gc_pause_seconds_count":
            gen["count"] += int(d)
            if generation == "2":
                gc_full += int(d)
                entry["full"] += int(d)
        elif n == "asr_gc_pause_seconds_bucket":
            edge = float(lab.get("le", "inf"))
            by_edge = longest.setdefault(process, {})
            by_edge[edge] = by_edge.get(edge, 0) + int(d)
    # The longest pause of each process, as the smallest bucket edge that holds every pause of the
    # level (a bound, not a reading): a sum hides whether it was many short pauses or one stall.
    for process, by_edge in longest.items():
        total = max(by_edge.values(), default=0)
        bound = next((edge for edge in sorted(by_edge) if by_edge[edge] >= total), None) if total else None
        gc_by_process[process]["longest_ms_at_most"] = (None if bound is None or bound == float("inf")
                                                        else round(1e3 * bound, 1))
    # streams opened through each frontend process during the level (asr_frontend_streams_total,
    # with --frontends): the kernel spreads connections, not streams, over them
    frontend_streams = {}
    for (n, labels), v in after.items():
        if n == "asr_frontend_streams_total":
            d = int(v - before.get((n, labels), 0.0))
            if d:
                frontend_streams[dict(labels).get("frontend", "?")] = d
    return {
        "steps": int(steps), "steps_per_s": round(steps / wall_s, 2) if wall_s > 0 else None,
        "steps_by_engine": engines, "engine_executions": executions,
        "frontend_streams": frontend_streams,
        "mean_batch": mean("asr_batch_size"), "mean_step_ms": mean("asr_step_seconds", 1e3),
        # inside the engine (the rest of mean_step_ms is the way to the engine worker and back)
        "mean_engine_step_ms": mean("asr_engine_step_seconds", 1e3),
        # steps whose host preparation ran while the step before them was on the device (the
        # engine worker's overlap of its two steps in flight)
        "steps_prepared_ahead_share": (round(_delta(before, after, "asr_engine_steps_prepared_ahead_total") / steps, 3)
                                       if steps > 0 else None),
        "phase_ms_mean": phases, "phase_samples": phase_samples,
        "engine_worker_ms_mean": worker,  # the way to the engine worker process and back, by part
        "step_ms_p50": q("asr_step_seconds", 0.5), "step_ms_p95": q("asr_step_seconds", 0.95),
        "mean_queue_wait_ms": mean("asr_queue_wait_seconds", 1e3), "queue_wait_ms_p95": q("asr_queue_wait_seconds", 0.95),
        "server_chunk_latency_ms_p50": q("asr_chunk_latency_seconds", 0.5),
        "server_chunk_latency_ms_p95": q("asr_chunk_latency_seconds", 0.95),
        # the same chunks' responses written to their calls (the frontends' side): the gap to the
        # two above is the way to the frontends, their work and gRPC's writes
        "server_chunk_written_ms_p50": q("asr_chunk_written_seconds", 0.5),
        "server_chunk_written_ms_p95": q("asr_chunk_written_seconds", 0.95),
        "engine_busy_fraction": (round(_delta(before, after, "asr_step_seconds_sum") / wall_s, 3)
                                 if wall_s > 0 else None),
        "gc_pause_ms_total": round(1e3 * gc_pause_s, 1), "gc_full_collections": gc_full,
        "gc_by_process": gc_by_process,
        "errors_and_faults": faults,
        "max_batch_now": after.get(("asr_max_batch", ())),
        "note": "histogram quantiles are interpolated within Prometheus buckets (coarse)",
    }


# -- server process CPU (same machine: /proc) -------------------------------------------------------
def _ticks(stat_path: str) -> tuple[str, int] | None:
    try:
        with open(stat_path) as f:
            data = f.read()
    except OSError:
        return None
    name = data[data.index("(") + 1:data.rindex(")")]
    fields = data[data.rindex(")") + 2:].split()
    return name, int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of stat)


ENGINE_WORKER_NAME = "asr-engine"  # the process name server.runtime.engine_worker gives its child


def child_role(pid: int) -> str:
    """What an asr-server child process is: "frontend" (--frontends), "engine" (the engine
    worker), or "other" (multiprocessing's resource tracker)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"--frontend-of" in f.read().split(b"\0"):
                return "frontend"
        with open(f"/proc/{pid}/comm") as f:
            return "engine" if f.read().strip() == ENGINE_WORKER_NAME else "other"
    except OSError:
        return "other"


def child_pids(pid: int, role: str | None = None) -> list[int]:
    """Child processes of pid (an asr-server: its engine worker, frontend processes with
    --frontends, multiprocessing's resource tracker); only those of `role` when given."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    data = f.read()
            except OSError:
                continue
            if int(data[data.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry))
    return [c for c in found if role is None or child_role(c) == role]


def proc_cpu_snapshot(pid: int) -> dict | None:
    """CPU clock ticks of a process and of each of its threads (Linux /proc), and of its child
    processes (total and main thread), or None."""
    total = _ticks(f"/proc/{pid}/stat")
    if total is None:
        return None
    threads = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = []
    for tid in tids:
        t = _ticks(f"/proc/{pid}/task/{tid}/stat")
        if t is not None:
            threads[tid] = t
    children = {}
    for child in child_pids(pid):
        whole, main = _ticks(f"/proc/{child}/stat"), _ticks(f"/proc/{child}/task/{child}/stat")
        if whole is not None and main is not None:
            children[child] = (whole[1], main[1], child_role(child))
    return {"t": time.monotonic(), "pid": pid, "total": total[1], "threads": threads, "children": children}


def proc_cpu_delta(before: dict | None, after: dict | None, top: int = 6) -> dict | None:
    """Cores the process used between two snapshots, and its busiest threads: a thread near 1.0
    (the event loop, the engine thread) is the server's bottleneck."""
    if not before or not after:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    wall = after["t"] - before["t"]
    if wall <= 0:
        return None
    threads = []
    for tid, (name, ticks) in after["threads"].items():
        prev = before["threads"].get(tid, (name, 0))[1]
        main = int(tid) == after.get("pid")
        threads.append({"tid": int(tid), "name": f"{name} (main thread: event loop)" if main else name,
                        "main": main, "cores": round((ticks - prev) / hz / wall, 3)})
    threads.sort(key=lambda t: -t["cores"])
    main = next((t["cores"] for t in threads if t["main"]), None)
    out = {"cores": round((after["total"] - before["total"]) / hz / wall, 3), "main_thread_cores": main,
           "wall_s": round(wall, 2), "busiest_threads": threads[:top]}
    # Child processes: each frontend's cores and its event loop's (main thread) cores; the
    # engine worker's (its main thread is the engine thread).
    frontends, others = [], 0.0
    for child, (whole, loop, role) in sorted(after.get("children", {}).items()):
        w0, l0, _ = before.get("children", {}).get(child, (0, 0, role))
        entry = {"pid": child, "cores": round((whole - w0) / hz / wall, 3),
                 "main_thread_cores": round((loop - l0) / hz / wall, 3)}
        if role == "frontend":
            frontends.append(entry)
        elif role == "engine":
            out["engine_worker"] = entry
        else:
            others += entry["cores"]
    if frontends:
        out["frontends"] = frontends
    if after.get("children"):
        out["cores_all_processes"] = round(out["cores"] + others + sum(f["cores"] for f in frontends)
                                           + out.get("engine_worker", {}).get("cores", 0.0), 3)
    return out
