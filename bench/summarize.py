"""Merge one benchmark run (bench/run_h100.sh) into summary.json and summary.md: our service's
sweep and capacity per lookahead (asr-loadgen reports), NeMo's CacheAwareRNNTPipeline baseline
(JSON lines of .devbench/nemo_pipeline_baseline.py), the ratios and the issue's targets.

  python bench/summarize.py --out DIR [--baseline baseline.jsonl] [--env env.json]

Reads DIR/loadgen_<lookahead>.json (the main measurement: long streams by default), with
--churn CHURN_DIR the churn variant CHURN_DIR/churn_<lookahead>.json (one short clip per stream:
stream openings and finals as much as steady serving), and, with --ttf TTF_DIR, the time-to-final
runs TTF_DIR/ttf_<server>_<mode>.json (asr-loadgen reports of calls of several utterances); writes
DIR/summary.json and DIR/summary.md, and prints the markdown. Standard library only.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re

# The targets: (lookahead ms, p95 latency bound ms, streams).
CAPACITY_TARGETS = {160: (160.0, 1000), 560: (560.0, 2000)}
C1_P50_TARGET_MS = {160: 25.0}
# Time to final (issue 14), at 160 ms lookahead on one stream: client end of utterance -> final
# median; with endpointing: end of speech -> final median <= stop_history + lookahead, p95 100 ms
# more; at capacity (any lookahead): p95 <= stop_history + 2 x lookahead.
EOU_C1_P50_TARGET_MS = {160: 25.0}
TTF_C1_P95_SLACK_MS = 100.0


def _f(v, nd=1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _secs(v) -> str:
    return "-" if v is None else f"{v:g}"


def load_loadgen(out: str | None, prefix: str = "loadgen") -> dict[int, dict]:
    reports = {}
    if not out:
        return reports
    for path in sorted(glob.glob(os.path.join(out, f"{prefix}_*.json"))):
        m = re.search(prefix + r"_(\d+)\.json$", path)
        if m:
            with open(path) as f:
                reports[int(m.group(1))] = json.load(f)
    return reports


def load_ttf(folder: str | None) -> list[dict]:
    """The time-to-final runs: per server and mode, each level's utterance figures."""
    runs = []
    if not folder:
        return runs
    for path in sorted(glob.glob(os.path.join(folder, "ttf_*_*.json"))):
        m = re.search(r"ttf_(.+)_(endpoint|client_eou)\.json$", path)
        if not m:
            continue
        with open(path) as f:
            rep = json.load(f)
        st = rep.get("settings", {})
        levels = []
        for lv in rep.get("levels", []):
            u = lv.get("utterances") or {}
            t, e = u.get("time_to_final_ms") or {}, u.get("eou_to_final_ms") or {}
            levels.append({"c": lv["concurrency"], "done": lv["streams_completed"], "errors": lv["errors"],
                           "chunk_p50": lv["chunk_latency_ms"]["p50"], "chunk_p95": lv["chunk_latency_ms"]["p95"],
                           **{f"ttf_p{p}": t.get(f"p{p}") for p in (50, 90, 95, 99)},
                           **{f"eou_p{p}": e.get(f"p{p}") for p in (50, 90, 95, 99)},
                           "utterances": u.get("sent"), "with_final": u.get("with_final"), "missed": u.get("missed"),
                           "extra_finals": u.get("extra_finals"), "eou_preempted": u.get("eou_preempted"),
                           "end_reasons": u.get("end_reasons"), "lg_bound": lv["loadgen"]["bottleneck"]})
        server = rep.get("server", {})
        runs.append({"server": m.group(1), "mode": m.group(2), "model": server.get("name"),
                     "engine": rep.get("server_after", server).get("engine"), "lookahead_ms": server.get("lookahead_ms"),
                     "endpointing": st.get("endpointing"), "client_eou_ms": st.get("client_eou_ms"),
                     "utterances_per_call": st.get("utterances"), "pause_s": st.get("pause_s"),
                     "audio": (st.get("audio") or {}).get("paths"), "levels": levels})
    return runs


def ttf_targets(runs: list[dict]) -> list[dict]:
    out = []
    for r in runs:
        la, name = r["lookahead_ms"], f"{r['server']} ({r['model']}, {r['lookahead_ms']} ms)"
        one = next((lv for lv in r["levels"] if lv["c"] == 1), None)
        top = max((lv for lv in r["levels"] if lv["c"] > 1), key=lambda lv: lv["c"], default=None)
        if r["mode"] == "client_eou" and la in EOU_C1_P50_TARGET_MS and one:
            t, v = EOU_C1_P50_TARGET_MS[la], one["eou_p50"]
            out.append({"what": f"{name}: c=1 client end of utterance -> final p50 <= {t:g} ms", "value": _f(v),
                        "verdict": "-" if v is None else ("PASS" if v <= t else "FAIL")})
        stop = (r.get("endpointing") or {}).get("stop_history_ms")
        if r["mode"] == "endpoint" and stop and la:
            if la == 160 and one:
                for key, bound in (("ttf_p50", stop + la), ("ttf_p95", stop + la + TTF_C1_P95_SLACK_MS)):
                    v = one[key]
                    out.append({"what": f"{name}: c=1 end of speech -> final {key[4:]} <= {bound:g} ms "
                                        f"(stop_history {stop} ms; {one['missed']} of {one['utterances']} missed)",
                                "value": _f(v), "verdict": "-" if v is None else ("PASS" if v <= bound else "FAIL")})
            if top:
                bound, v = stop + 2 * la, top["ttf_p95"]
                out.append({"what": f"{name}: c={top['c']} (capacity) end of speech -> final p95 <= {bound:g} ms "
                                    f"({top['missed']} of {top['utterances']} missed)",
                            "value": _f(v), "verdict": "-" if v is None else ("PASS" if v <= bound else "FAIL")})
    return out


def load_baseline(path: str | None) -> tuple[list[dict], list[dict]]:
    runs, calibration = [], []
    if not path or not os.path.exists(path):
        return runs, calibration
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            (runs if "rtfx" in d else calibration).append(d)
    return runs, calibration


def _lookahead_of_ctx(ctx) -> int:
    return (int(ctx[1]) + 1) * 80  # [70, r]: (r + 1) * 80 ms


def baseline_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        la = _lookahead_of_ctx(r["ctx"])
        chunk_s = la / 1000.0
        steps = math.ceil(r["audio_s"] / r["files"] / chunk_s) * math.ceil(r["files"] / r["batch"])
        rows.append({**r, "lookahead_ms": la,
                     "est_ms_per_step": round(1e3 * r["wall_s"] / steps, 2) if steps else None,
                     "note": "ms/step estimated as wall / (chunks per file x batches); every file has the same length"})
    return rows


def _level_at(report: dict, c: int | None) -> dict | None:
    if c is None:
        return None
    for lv in report["levels"]:
        if lv["concurrency"] == c:
            return lv
    return None


def stream_seconds(report: dict) -> float | None:
    """Audio seconds each stream played: --stream-seconds, else the synthetic clip's length
    (None for WAV files of mixed lengths)."""
    st = report.get("settings") or {}
    audio = st.get("audio") or {}
    if st.get("stream_seconds"):
        return float(st["stream_seconds"])
    if not audio.get("paths") and not audio.get("utterances"):
        return audio.get("synthetic_seconds")
    return None


def per_1k(cores, c) -> float | None:
    """Server CPU cores per 1,000 concurrent streams."""
    return round(1000.0 * cores / c, 3) if cores is not None and c else None


def ours(la: int, report: dict) -> dict:
    levels = sorted(report["levels"], key=lambda lv: lv["concurrency"])
    target = report["settings"]["target_ms"]
    cap = report.get("capacity") or {}
    c1 = _level_at(report, 1)
    passing_chunk = [lv["concurrency"] for lv in levels if lv.get("passes_target", {}).get("chunk")]
    passing_resp = [lv["concurrency"] for lv in levels if lv.get("passes_target", {}).get("response")]
    at_cap = _level_at(report, cap.get("capacity"))
    best = max(levels, key=lambda lv: lv["throughput"]["rtfx"] or 0, default=None)
    cap_cores = _server_cores(at_cap.get("server_process") or {}) if at_cap else None
    return {
        "lookahead_ms": la, "engine": report["server"]["engine"], "engine_after": report["server_after"]["engine"],
        "engine_executions": report["server_after"]["engine_executions"], "model": report["server"]["name"],
        "max_batch": report["server"]["max_batch"], "max_streams": report["server"]["max_streams"],
        "target_ms": target, "capacity_metric": cap.get("metric"), "stream_s": stream_seconds(report),
        "capacity": cap.get("capacity"), "capacity_bracket": cap.get("bracket"),
        "capacity_search_unfinished": cap.get("search_unfinished"),
        "capacity_chunk_metric_measured": max(passing_chunk, default=0),
        "capacity_response_metric_measured": max(passing_resp, default=0),
        "c1_chunk_p50_ms": c1["chunk_latency_ms"]["p50"] if c1 else None,
        "c1_response_p50_ms": c1["response_latency_ms"]["p50"] if c1 else None,
        "c1_final_p50_ms": c1["final_latency_ms"]["p50"] if c1 else None,
        "best_rtfx": best["throughput"]["rtfx"] if best else None,
        "best_rtfx_at": best["concurrency"] if best else None,
        "at_capacity": _breakdown(at_cap),
        "server_cores_at_capacity": cap_cores,
        "server_cores_per_1k_streams_at_capacity": per_1k(cap_cores, at_cap["concurrency"] if at_cap else None),
        "loadgen_bound_levels": [lv["concurrency"] for lv in levels if lv["loadgen"]["bottleneck"]],
        "levels": [_level_row(lv) for lv in levels],
    }


def _breakdown(lv: dict | None) -> dict | None:
    if lv is None:
        return None
    sm = lv.get("server_metrics") or {}
    return {
        "concurrency": lv["concurrency"],
        "client_chunk_p50_ms": lv["chunk_latency_ms"]["p50"], "client_response_p50_ms": lv["response_latency_ms"]["p50"],
        "server_chunk_latency_p50_ms": sm.get("server_chunk_latency_ms_p50"),
        "server_mean_step_ms": sm.get("mean_step_ms"), "server_mean_batch": sm.get("mean_batch"),
        "server_mean_queue_wait_ms": sm.get("mean_queue_wait_ms"), "engine_busy_fraction": sm.get("engine_busy_fraction"),
        "steps_per_s": sm.get("steps_per_s"), "loadgen_cpu_util": lv["loadgen"]["cpu_util"],
        "loadgen_loop_lag_p99_ms": lv["loadgen"]["loop_lag_ms"]["p99"],
        "server_process": lv.get("server_process"),
        "engine_step_ms": sm.get("mean_engine_step_ms"), "phase_ms": sm.get("phase_ms_mean") or {},
        "phase_samples": sm.get("phase_samples"), "worker_ms": sm.get("engine_worker_ms_mean") or {},
        "prepared_ahead_share": sm.get("steps_prepared_ahead_share"),
    }


def _server_cores(sp: dict):
    """CPU cores of every server process (with frontend processes: all of them)."""
    return sp.get("cores_all_processes") or sp.get("cores_with_frontends") or sp.get("cores")


def _level_row(lv: dict) -> dict:
    sm = lv.get("server_metrics") or {}
    sp = lv.get("server_process") or {}
    return {
        "c": lv["concurrency"], "done": lv["streams_completed"], "errors": lv["errors"],
        "chunk_p50": lv["chunk_latency_ms"]["p50"], "chunk_p95": lv["chunk_latency_ms"]["p95"],
        "resp_p50": lv["response_latency_ms"]["p50"], "resp_p95": lv["response_latency_ms"]["p95"],
        "final_p95": lv["final_latency_ms"]["p95"], "rtfx": lv["throughput"]["rtfx"],
        "batch": sm.get("mean_batch"), "step_ms": sm.get("mean_step_ms"), "queue_ms": sm.get("mean_queue_wait_ms"),
        "busy": sm.get("engine_busy_fraction"), "lg_bound": lv["loadgen"]["bottleneck"],
        "lg_cpu_max": max(lv["loadgen"]["cpu_util"], default=None),
        # With frontend processes: all of the server's processes, and the busiest frontend's event loop.
        "srv_cores": _server_cores(sp),
        "srv_cores_per_1k": per_1k(_server_cores(sp), lv["concurrency"]),
        "engine_worker": (sp.get("engine_worker") or {}).get("cores"),
        "srv_main": sp.get("main_thread_cores"),
        "fe_loop_max": max((f["main_thread_cores"] for f in sp.get("frontends", [])), default=None),
        # and the least busy one's: connections, not streams, are spread over the frontends
        "fe_loop_min": min((f["main_thread_cores"] for f in sp.get("frontends", [])), default=None),
        "fe_streams": sorted((sm.get("frontend_streams") or {}).values(), reverse=True),
        "gc_ms": sm.get("gc_pause_ms_total"), "gc_full": sm.get("gc_full_collections"),
        "gc_engine": (sm.get("gc_by_process") or {}).get("engine"),
    }


def _overview(runs: list[dict]) -> list[str]:
    lines = ["| lookahead | stream s | engine that ran | c=1 chunk p50 ms | c=1 response p50 ms "
             "| capacity (metric, p95 <= target) | levels passing chunk p95 | best RTFx (at c) "
             "| server CPU cores per 1,000 streams at capacity |",
             "|---|---|---|---|---|---|---|---|---|"]
    for o in runs:
        cap = f"{_f(o['capacity'])} ({o['capacity_metric']} <= {o['target_ms']:g} ms, bracket {o['capacity_bracket']})"
        if o.get("capacity_search_unfinished"):
            cap += " unfinished"
        lines.append(f"| {o['lookahead_ms']} ms | {_secs(o['stream_s'])} | {o['engine']} ({o['engine_executions']}) "
                     f"| {_f(o['c1_chunk_p50_ms'])} | {_f(o['c1_response_p50_ms'])} | {cap} "
                     f"| up to {o['capacity_chunk_metric_measured']} | {_f(o['best_rtfx'])} ({o['best_rtfx_at']}) "
                     f"| {_f(o.get('server_cores_per_1k_streams_at_capacity'), 2)} |")
    return lines


def _levels_table(o: dict) -> list[str]:
    lines = ["| c | done | errors | chunk p50 | chunk p95 | resp p50 | resp p95 | final p95 | RTFx | mean batch "
             "| step ms | queue ms | engine busy | server CPU cores (main thread) [busiest / least busy frontend loop; "
             "streams per frontend] "
             "{engine worker} "
             "| server cores per 1,000 streams | GC ms (full) [engine process, its longest pause ms] | loadgen CPU max | LG-bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in o["levels"]:
        lines.append(f"| {r['c']} | {r['done']} | {r['errors'] or 0} | {_f(r['chunk_p50'])} | {_f(r['chunk_p95'])} "
                     f"| {_f(r['resp_p50'])} | {_f(r['resp_p95'])} | {_f(r['final_p95'])} | {_f(r['rtfx'])} "
                     f"| {_f(r['batch'])} | {_f(r['step_ms'])} | {_f(r['queue_ms'])} | {_f(r['busy'], 2)} "
                     f"| {_f(r['srv_cores'], 2)} ({_f(r['srv_main'], 2)})"
                     + (f" [{_f(r['fe_loop_max'], 2)} / {_f(r.get('fe_loop_min'), 2)}"
                        + (f"; streams {' / '.join(str(n) for n in r['fe_streams'])}" if r.get("fe_streams") else "")
                        + "]" if r.get("fe_loop_max") is not None else "")
                     + (f" {{{_f(r['engine_worker'], 2)}}}" if r.get("engine_worker") is not None else "") + " "
                     f"| {_f(r.get('srv_cores_per_1k'), 2)} "
                     f"| {_f(r.get('gc_ms'))} ({r.get('gc_full') if r.get('gc_full') is not None else '-'})"
                     + (f" [engine {_f(r['gc_engine']['ms'])} ({r['gc_engine']['full']})"
                        + (f", longest <= {_f(r['gc_engine']['longest_ms_at_most'])}"
                           if r['gc_engine'].get("longest_ms_at_most") is not None else "")
                        + "]" if r.get("gc_engine") else "")
                     + " "
                     f"| {_f(r['lg_cpu_max'], 2)} | {'yes' if r['lg_bound'] else ''} |")
    return lines


def markdown(summary: dict) -> str:
    env = summary.get("env") or {}
    lines = [f"# Benchmark run: {env.get('gpu', 'unknown GPU')}", ""]
    if env:
        lines += [f"- machine: {env.get('gpu', '?')}, {env.get('cpus', '?')} CPU cores; torch {env.get('torch', '?')}, "
                  f"NeMo {env.get('nemo', '?')}, grpcio {env.get('grpcio', '?')}, Python {env.get('python', '?')}",
                  f"- command: `{env.get('command', 'bash bench/run_h100.sh')}`; commit {env.get('commit_line') or env.get('commit', '?')}"
                  + (f" (source {env['source_revision'].get('source')}, tree sha256 "
                     f"{env['source_revision'].get('tree_sha256', '?')[:16]})" if env.get("source_revision") else ""),
                  f"- settings: {json.dumps(env.get('settings', {}))}", ""]
    lines += ["## Our service (asr-server + asr-loadgen on the same machine, real-time streams)", ""]
    lines += _overview(summary["ours"])
    for o in summary["ours"]:
        lines += ["", f"### {o['lookahead_ms']} ms lookahead: levels, streams of {_secs(o['stream_s'])} s "
                      f"({o['model']}, max batch {o['max_batch']})", ""]
        lines += _levels_table(o)
    if summary.get("churn"):
        lines += ["", "## Churn variant (one short clip per stream: stream openings, first chunks and finals "
                      "weigh as much as steady serving)", ""]
        lines += _overview(summary["churn"])
        for o in summary["churn"]:
            lines += ["", f"### churn, {o['lookahead_ms']} ms lookahead: levels, streams of {_secs(o['stream_s'])} s", ""]
            lines += _levels_table(o)
    base = summary["baseline"]
    lines += ["", "## NeMo 3.0 CacheAwareRNNTPipeline baseline (same model shape, same GPU, in-process, max rate)", "",
              f"dtype: NeMo's pipeline {base.get('dtype') or '?'} (BASE_DTYPE), our server {summary.get('dtype') or '?'}: "
              f"{_dtype_phrase(summary.get('dtype'), base.get('dtype'))}", ""]
    if base["runs"]:
        lines += ["| lookahead | batch | files x s | dtype | wall s | RTFx | est. ms/step |", "|---|---|---|---|---|---|---|"]
        for r in base["runs"]:
            lines.append(f"| {r['lookahead_ms']} ms | {r['batch']} | {r['files']} x {r['audio_s'] / r['files']:g} "
                         f"| {base.get('dtype', '?')} | {r['wall_s']} | {r['rtfx']} | {_f(r['est_ms_per_step'])} |")
    else:
        lines.append(f"not run: {base.get('skipped') or 'no baseline output'}")
    if summary.get("time_to_final"):
        lines += ["", "## Time to final (calls of several utterances with pauses, real time)", "",
                  "end of speech -> final: the message holding an utterance's last speech sample sent -> its final "
                  "received; EOU -> final: the client's end_utterance request -> the final (ms)", "",
                  "| server (model, lookahead) | mode | c | done | errors | utterances with final / sent (extra) "
                  "| closed by | speech->final p50/p90/p95/p99 | EOU->final p50/p90/p95/p99 | chunk p50/p95 | LG-bound |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in summary["time_to_final"]:
            mode = (f"endpointing stop {(r.get('endpointing') or {}).get('stop_history_ms')} ms"
                    if r["mode"] == "endpoint" else f"client EOU {_f(r.get('client_eou_ms'), 0)} ms after speech")
            for lv in r["levels"]:
                reasons = ", ".join(f"{k} {v}" for k, v in (lv["end_reasons"] or {}).items())
                lines.append(
                    f"| {r['server']} ({r['model']}, {r['lookahead_ms']} ms) | {mode} | {lv['c']} | {lv['done']} "
                    f"| {sum((lv['errors'] or {}).values())} | {lv['with_final']}/{lv['utterances']} ({lv['extra_finals']}) "
                    f"| {reasons} | " + "/".join(_f(lv[f'ttf_p{p}']) for p in (50, 90, 95, 99)) + " | "
                    + "/".join(_f(lv[f'eou_p{p}']) for p in (50, 90, 95, 99))
                    + f" | {_f(lv['chunk_p50'])}/{_f(lv['chunk_p95'])} | {'yes' if lv['lg_bound'] else ''} |")
    lines += ["", "## Ratios and targets", ""]
    for t in summary["targets"]:
        lines.append(f"- {t['what']}: {t['value']} -> {t['verdict']}")
    for r in summary["ratios"]:
        lines.append(f"- {r['what']}: {r['value']}")
    for r in summary.get("server_cpu_per_1k_streams", []):
        lines.append(f"- {r['what']}: {r['value']}")
    lines += ["", "## Where the time goes (at the capacity level)", ""]
    for o in summary["ours"]:
        b = o["at_capacity"]
        if not b:
            lines.append(f"- {o['lookahead_ms']} ms: no level passed")
            continue
        lines.append(
            f"- {o['lookahead_ms']} ms at c={b['concurrency']}: client chunk p50 {_f(b['client_chunk_p50_ms'])} ms = "
            f"wait for the chunk's audio incl. right context + response p50 {_f(b['client_response_p50_ms'])} ms; "
            f"server-side chunk latency p50 {_f(b['server_chunk_latency_p50_ms'])} ms (queue wait mean "
            f"{_f(b['server_mean_queue_wait_ms'])} ms, step mean {_f(b['server_mean_step_ms'])} ms at mean batch "
            f"{_f(b['server_mean_batch'])}, {_f(b['steps_per_s'])} steps/s, engine thread busy "
            f"{_f(b['engine_busy_fraction'], 2)}); the rest of response latency is gRPC, the server's event loop and "
            f"the load generator (its CPU {b['loadgen_cpu_util']}, loop lag p99 {_f(b['loadgen_loop_lag_p99_ms'])} ms)"
            + (f"; server process {_f(b['server_process']['cores'], 2)} cores, its main thread (event loop, gRPC) "
               f"{_f(b['server_process']['main_thread_cores'], 2)} of one core" if b.get("server_process") else "")
            + (f"; engine worker process {_f(b['server_process']['engine_worker']['cores'], 2)} cores"
               if (b.get("server_process") or {}).get("engine_worker") else ""))
        if b.get("engine_step_ms"):
            phases = ", ".join(f"{k} {_f(v, 2)}" for k, v in b["phase_ms"].items())
            lines.append(
                f"  - inside the engine: step mean {_f(b['engine_step_ms'])} ms of the scheduler's "
                f"{_f(b['server_mean_step_ms'])} ms (the rest: the pipe to the engine worker and back)"
                + (f"; phases in ms, mean of {b['phase_samples']} steps synchronized at each phase: {phases}"
                   if phases else "")
                + ("; the way to the worker and back in ms: "
                   + ", ".join(f"{k} {_f(v, 2)}" for k, v in b["worker_ms"].items()) if b.get("worker_ms") else "")
                + (f"; {_f(100 * b['prepared_ahead_share'], 0)}% of steps prepared while the step before them ran "
                   "(the worker's overlap)" if b.get("prepared_ahead_share") is not None else ""))
    if any(o["loadgen_bound_levels"] for o in summary["ours"]):
        lines.append("- the load generator was the bottleneck at: "
                     + "; ".join(f"{o['lookahead_ms']} ms: {o['loadgen_bound_levels']}" for o in summary["ours"]
                                 if o["loadgen_bound_levels"]))
    return "\n".join(lines) + "\n"


def _dtype_phrase(ours_dtype: str | None, base_dtype: str | None) -> str:
    if ours_dtype and ours_dtype == base_dtype:
        return f"both {ours_dtype}"
    return f"ours {ours_dtype or '?'}, NeMo's {base_dtype or '?'}: NOT the same dtype"


def capacity_ratio(o: dict, best: dict, ours_dtype: str | None, base_dtype: str | None, variant: str) -> dict:
    """Our real-time capacity over NeMo's offline RTFx, with what the ratio means: NeMo's RTFx
    (audio seconds per wall second at max rate on files) bounds the real-time streams its pipeline
    could carry, with no latency bound; ours counts streams that met the p95 target."""
    cap = o["capacity"] or 0
    length = f"streams of {_secs(o['stream_s'])} s" if o.get("stream_s") else "streams"
    return {"what": f"{o['lookahead_ms']} ms{variant}: our real-time {length} at p95 {o['capacity_metric']} latency "
                    f"<= {o['target_ms']:g} ms over NeMo's offline RTFx at batch {best['batch']} "
                    f"({best['files']} files of {best['audio_s'] / best['files']:g} s at max rate: an upper bound "
                    f"on the real-time streams it could carry, with no latency bound), "
                    f"{_dtype_phrase(ours_dtype, base_dtype)}",
            "value": f"{cap} / {best['rtfx']} = {cap / best['rtfx']:.2f}x",
            "ours": cap, "nemo_rtfx": best["rtfx"], "ratio": round(cap / best["rtfx"], 3),
            "ours_dtype": ours_dtype, "nemo_dtype": base_dtype, "variant": variant.strip(" ,") or "main"}


def cpu_lines(runs: list[dict], variant: str) -> list[dict]:
    out = []
    for o in runs:
        b = o["at_capacity"]
        if not b or o["server_cores_at_capacity"] is None:
            continue
        out.append({"what": f"{o['lookahead_ms']} ms{variant}: server CPU cores per 1,000 streams at capacity "
                            f"(c={b['concurrency']}, every server process: {_f(o['server_cores_at_capacity'], 2)} cores)",
                    "value": _f(o["server_cores_per_1k_streams_at_capacity"], 2),
                    "lookahead_ms": o["lookahead_ms"], "variant": variant.strip(" ,") or "main",
                    "concurrency": b["concurrency"], "server_cores": o["server_cores_at_capacity"],
                    "cores_per_1k_streams": o["server_cores_per_1k_streams_at_capacity"]})
    return out


def summarize(out: str, baseline_path: str | None, env_path: str | None, baseline_dtype: str | None,
              baseline_skipped: str | None, ttf_dir: str | None = None, churn_dir: str | None = None) -> dict:
    reports = load_loadgen(out)
    churn_reports = load_loadgen(churn_dir, "churn")
    env = {}
    if env_path and os.path.exists(env_path):
        with open(env_path) as f:
            env = json.load(f)
    ours_dtype = (env.get("settings") or {}).get("dtype")
    runs, calibration = load_baseline(baseline_path)
    base_rows = baseline_rows(runs)
    our = [ours(la, reports[la]) for la in sorted(reports)]
    churn = [ours(la, churn_reports[la]) for la in sorted(churn_reports)]
    churn_by_la = {o["lookahead_ms"]: o for o in churn}
    targets, ratios = [], []
    for o in our:
        la = o["lookahead_ms"]
        if la in C1_P50_TARGET_MS:
            t = C1_P50_TARGET_MS[la]
            # Long streams leave out c=1 (a 60 s level for one stream); the churn variant has it.
            src, where = o, ""
            if o["c1_chunk_p50_ms"] is None and churn_by_la.get(la, {}).get("c1_chunk_p50_ms") is not None:
                src, where = churn_by_la[la], f" (churn variant, streams of {_secs(churn_by_la[la]['stream_s'])} s)"
            for key, name in (("c1_chunk_p50_ms", "chunk"), ("c1_response_p50_ms", "response")):
                v = src[key]
                targets.append({"what": f"{la} ms: c=1 {name} latency p50 < {t:g} ms{where}", "value": _f(v),
                                "verdict": "-" if v is None else ("PASS" if v < t else "FAIL")})
        if la in CAPACITY_TARGETS:
            bound, need = CAPACITY_TARGETS[la]
            length = f" (streams of {_secs(o['stream_s'])} s)" if o.get("stream_s") else ""
            for key, name in (("capacity_response_metric_measured", "response"),
                              ("capacity_chunk_metric_measured", "chunk")):
                v = o[key]
                targets.append({"what": f"{la} ms: streams with {name} p95 <= {bound:g} ms and zero errors >= {need}"
                                        f"{length}", "value": v, "verdict": "PASS" if v >= need else "FAIL"})
        best = max((r for r in base_rows if r["lookahead_ms"] == la), key=lambda r: r["rtfx"], default=None)
        if best:
            ratios.append(capacity_ratio(o, best, ours_dtype, baseline_dtype, ""))
            if la in churn_by_la:
                ratios.append(capacity_ratio(churn_by_la[la], best, ours_dtype, baseline_dtype, ", churn variant"))
            if o["at_capacity"] and o["at_capacity"]["server_mean_step_ms"] and best["est_ms_per_step"]:
                ratios.append({"what": f"{la} ms: our mean step ms at capacity (batch "
                                       f"{_f(o['at_capacity']['server_mean_batch'])}) vs NeMo est. ms/step (batch {best['batch']})",
                               "value": f"{o['at_capacity']['server_mean_step_ms']} vs {best['est_ms_per_step']}"})
    ttf = load_ttf(ttf_dir)
    targets += ttf_targets(ttf)
    summary = {"env": env, "dtype": ours_dtype, "ours": our, "churn": churn,
               "baseline": {"runs": base_rows, "calibration": calibration, "dtype": baseline_dtype,
                            "skipped": baseline_skipped},
               "targets": targets, "ratios": ratios,
               "server_cpu_per_1k_streams": cpu_lines(our, "") + cpu_lines(churn, ", churn variant"),
               "time_to_final": ttf}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    md = markdown(summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--baseline", default=None, help="JSON lines of nemo_pipeline_baseline.py")
    p.add_argument("--baseline-dtype", default=None)
    p.add_argument("--baseline-skipped", default=None, help="why the baseline did not run")
    p.add_argument("--env", default=None, help="JSON describing the machine and settings")
    p.add_argument("--ttf", default=None, help="folder of the time-to-final runs (ttf_<server>_<mode>.json)")
    p.add_argument("--churn", default=None, help="folder of the churn variant's runs (churn_<lookahead>.json)")
    a = p.parse_args()
    summarize(a.out, a.baseline, a.env, a.baseline_dtype, a.baseline_skipped, a.ttf, a.churn)
    with open(os.path.join(a.out, "summary.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
