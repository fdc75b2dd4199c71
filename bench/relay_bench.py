"""The engine process's CPU per chunk, with frontends that cost nothing (issue 17).

Why: with frontends the server's capacity is bound by the engine process (the parent: the
engine host relaying frontends' streams, the scheduler, the link to the engine worker); its
event loop runs at 0.84-0.93 of a core at 2,400 streams on the H200 (bench/RESULTS.md, runs
28-31). An end-to-end run on a 2-core machine cannot measure that process alone: the load
generator and the gRPC frontends take the cores it needs. Here the frontends are replaced by
this script's own wire links, which write each stream's audio a chunk at a time in real time
(as a frontend's hold does) into the engine's sample ring and say so once a tick (Written), or
with --audio-messages send it in Audio messages (a frontend that cannot map the rings), read
the results and acknowledge them as a frontend does, and cost a few microseconds a chunk.

It starts a real `asr-server --frontends 2` (the engine host, the scheduler and the engine
worker as they run in production; its two gRPC frontends stay idle) on the fake engine, finds
the engine host's socket (the frontend's --frontend-of argument), opens `--links` connections
to it with `--streams` streams between them, and after `--warm` seconds measures for
`--seconds`: the chunks answered, the engine process's CPU (user + system) and its engine
worker's, and the CPU per chunk.

  python bench/relay_bench.py --streams 1000 --seconds 15
  python bench/relay_bench.py --compare OLD_TREE,NEW_TREE --streams 1000 --repeats 3

--compare runs the server alternately from each source tree (PYTHONPATH) with the same load
script, so both see the same machine noise: compare the ratio within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

import numpy as np

from server.runtime import wire as w

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


class Link:
    """One fake frontend: a connection to the engine host and its streams."""

    def __init__(self, name: str, use_rings: bool = True):
        self.name = name
        self.use_rings = use_rings
        self.results = 0
        self.failed: list[str] = []
        self.unacked: dict[str, int] = {}
        self.out: w.FrameWriter | None = None
        self.ack_every = 16
        self.rings: list = []  # the engine cores' sample rings, mapped (none: audio in Audio messages)
        self.rows: dict[str, tuple[int, int]] = {}  # key -> (core, ring row), from Opened
        self.consumed: dict[str, int] = {}

    async def connect(self, path: str) -> w.Hello:
        self.frames = await w.open_link(path, w.ENGINE_TO_FRONTEND)
        self.out = w.FrameWriter(self.frames.transport)
        batch = await self.frames.read_frames()
        hello = w.check_hello(batch[0][0], w.ROLE_ENGINE_HOST)
        self.ack_every = max(1, int(hello.scheduler.get("response_buffer", 32)) // 2)
        if self.use_rings:
            from engines.sample_ring import SampleRing
            self.rings = [SampleRing.attach(r.path, r.slots, r.width) for r in hello.rings]
        self.out.send(w.Ready(self.name))
        return hello

    async def read(self) -> None:
        while (batch := await self.frames.read_frames()) is not None:
            for frame in batch:
                for m in frame:
                    kind = type(m)
                    if kind is w.Rows:  # a step's rows of this link's streams: each is a result
                        self.results += len(m.keys)
                        unacked = self.unacked
                        if self.rings:
                            self.consumed.update(zip(m.keys, m.columns.consumed))
                        for key in m.keys:
                            n = unacked.get(key, 0) + 1
                            if n >= self.ack_every:
                                self.out.send(w.Ack(key, n))
                                n = 0
                            unacked[key] = n
                    elif kind is w.Opened:
                        self.rows[m.key] = (m.core, m.slot)
                    elif kind is w.Failed:
                        self.failed.append(f"{m.kind}: {m.message}")

    def write(self, key: str, position: int, samples: np.ndarray, written: dict) -> bool:
        """A frontend's write of a stream's audio into its ring row (False: no row yet, or no
        room); `written` collects (core -> {row: total}) for the tick's Written messages."""
        where = self.rows.get(key)
        if where is None:
            return False
        core, slot = where
        ring = self.rings[core]
        if position + samples.size - self.consumed.get(key, 0) > ring.width:
            return False
        ring.write(slot, position, samples)
        written.setdefault(core, {})[slot] = position + samples.size
        return True


async def drive(path: str, streams: int, links: int, warm: float, seconds: float, server_pid: int,
                tick_s: float, use_rings: bool = True) -> dict:
    hello = None
    group = [Link(f"bench-{i}", use_rings) for i in range(links)]
    for link in group:
        hello = await link.connect(path)
    readers = [asyncio.get_running_loop().create_task(link.read()) for link in group]
    geometry = hello.geometry
    chunk, first = geometry.chunk_samples, geometry.samples_needed(0)
    period = chunk / geometry.sample_rate
    rng = np.random.default_rng(0)
    noise = (0.05 * rng.standard_normal(first + chunk)).astype(np.float32)
    first_audio, chunk_audio = noise[:first].tobytes(), noise[first:first + chunk].tobytes()
    keys = [[] for _ in group]
    for i in range(streams):
        key = uuid.uuid4().hex[:12]
        keys[i % links].append(key)
        link = group[i % links]
        link.out.send(w.Open(key, "", True, None, None, bool(link.rings)))
    positions: dict[str, int] = {}
    # Streams start spread over one period; each sends a chunk every period, in real time. Each
    # link writes a frame per tick with the chunks due then (a frontend writes at most one frame
    # a millisecond: server.runtime.remote_scheduler.FRAME_INTERVAL_S).
    slots = max(1, round(period / tick_s))
    start = time.monotonic() + 0.2
    sent_first: set[str] = set()
    worker = None
    measured: dict = {}
    tick = 0
    deadline = start + warm + seconds
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        due = start + tick * period / slots
        if due > now:
            await asyncio.sleep(due - now)
        part = tick % slots
        for link, mine in zip(group, keys):
            if link.rings:  # as a frontend does: write the ring, then one Written a core
                written: dict = {}
                for key in mine[part::slots]:
                    at = positions.get(key, 0)
                    audio = noise[first:first + chunk] if at else noise[:first]
                    if link.write(key, at, audio, written):
                        positions[key] = at + audio.size
                for core, rows in written.items():
                    link.out.send(w.Written(core, w.as_column(list(rows), w.I64),
                                            w.as_column(list(rows.values()), w.I64)))
                continue
            for key in mine[part::slots]:
                if key in sent_first:
                    link.out.send(w.Audio(key, chunk_audio))
                else:
                    link.out.send(w.Audio(key, first_audio))
                    sent_first.add(key)
        tick += 1
        if not measured and time.monotonic() >= start + warm:
            worker = next((p for p in children(server_pid) if "spawn_main" in " ".join(cmdline(p))), None)
            measured = {"t": time.monotonic(), "results": sum(link.results for link in group),
                        "cpu": cpu_seconds(server_pid), "worker_cpu": cpu_seconds(worker) if worker else 0.0,
                        "self_cpu": time.process_time()}
    t = time.monotonic()
    results = sum(link.results for link in group) - measured["results"]
    cpu = cpu_seconds(server_pid) - measured["cpu"]
    worker_cpu = (cpu_seconds(worker) - measured["worker_cpu"]) if worker else 0.0
    wall = t - measured["t"]
    for link, mine in zip(group, keys):
        for key in mine:
            link.out.send(w.Close(key))
        link.out.flush()
    for task in readers:
        task.cancel()
    failed = [f for link in group for f in link.failed]
    return {"streams": streams, "links": links, "seconds": round(wall, 2), "chunks_per_s": round(results / wall, 1),
            "expected_chunks_per_s": round(streams / period, 1),
            "engine_process_cores": round(cpu / wall, 3), "worker_cores": round(worker_cpu / wall, 3),
            "engine_process_us_per_chunk": round(1e6 * cpu / max(results, 1), 2), "tick_ms": round(1e3 * tick_s, 2),
            "load_cores": round((time.process_time() - measured["self_cpu"]) / wall, 3),
            "failed": len(failed), "first_failure": failed[0] if failed else None,
            "audio": "ring" if all(link.rings for link in group) else "messages"}


def run_once(args, tree: str | None) -> dict:
    env = dict(os.environ)
    env.setdefault("FAKE_ENGINE_STEP_DELAY_S", str(args.step_delay_s))
    if args.tokens_per_chunk is not None:
        env["FAKE_ENGINE_TOKENS_PER_CHUNK"] = str(args.tokens_per_chunk)
    if tree:
        env["PYTHONPATH"] = os.path.abspath(tree)
    cmd = [sys.executable, "-m", "server.service.cli", "--engine-factory", args.engine_factory, "--frontends", "2",
           "--port", "0", "--metrics-port", "0", "--max-batch", str(args.max_batch),
           "--max-streams", str(args.streams + 16), *args.server_args.split()]
    log = open(args.server_log, "a") if args.server_log else subprocess.DEVNULL
    server = subprocess.Popen(cmd, env=env, cwd=os.path.abspath(tree) if tree else None, stdout=subprocess.PIPE,
                              stderr=log, text=True)
    try:
        for line in server.stdout:
            if "listening on" in line:
                break
        else:
            raise RuntimeError("the server exited before it listened")
        path = None
        for _ in range(100):
            for pid in children(server.pid):
                argv = cmdline(pid)
                if "--frontend-of" in argv:
                    path = argv[argv.index("--frontend-of") + 1]
            if path:
                break
            time.sleep(0.1)
        if not path:
            raise RuntimeError("no frontend with --frontend-of found")
        return asyncio.run(drive(path, args.streams, args.links, args.warm, args.seconds, server.pid,
                                 args.tick_ms / 1e3, not args.audio_messages))
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--links", type=int, default=2, help="fake frontends (engine-host connections)")
    ap.add_argument("--warm", type=float, default=6.0)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--max-batch", type=int, default=512)
    ap.add_argument("--tick-ms", type=float, default=1.0, help="each link writes a frame this often")
    ap.add_argument("--step-delay-s", type=float, default=0.02, help="the fake engine's step time")
    ap.add_argument("--engine-factory", default="tests.fake_engine:build_fake_engine")
    ap.add_argument("--tokens-per-chunk", type=int, default=None,
                    help="tokens each chunk emits (default: the fake's 0-2; 6 is the random-weight "
                         "nemotron-0.6b's rate at 160 ms)")
    ap.add_argument("--server-args", default="", help="more asr-server arguments, space-separated")
    ap.add_argument("--audio-messages", action="store_true",
                    help="send audio in Audio messages, as a frontend that cannot map the rings does")
    ap.add_argument("--compare", default=None, help="comma-separated source trees, run alternately")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--server-log", default=None,
                    help="append the server's log here (NEMOSTREAM_GC_CENSUS_S=5 in the environment: its gc census)")
    args = ap.parse_args()
    rows = []
    if args.compare:
        trees = args.compare.split(",")
        for rep in range(args.repeats):
            for tree in (trees if rep % 2 == 0 else trees[::-1]):
                row = {"tree": tree, **run_once(args, tree)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        print("| tree | engine process us/chunk (runs) | median | cores | worker cores | chunks/s |")
        print("|---|---|---|---|---|---|")
        for tree in trees:
            mine = [r for r in rows if r["tree"] == tree]
            us = [r["engine_process_us_per_chunk"] for r in mine]
            print(f"| {tree} | {', '.join(f'{u:.1f}' for u in us)} | {statistics.median(us):.1f} | "
                  f"{statistics.median(r['engine_process_cores'] for r in mine):.3f} | "
                  f"{statistics.median(r['worker_cores'] for r in mine):.3f} | "
                  f"{statistics.median(r['chunks_per_s'] for r in mine):.0f} |")
    else:
        row = run_once(args, None)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
