"""Host cost of the scheduler's batch formation and result scatter, per row (issue 17).

One process, one event loop, no gRPC and no engine compute: a Scheduler (server.scheduling.scheduler) on
an engine whose step is a coroutine (`step_async`, so no engine thread) and returns a ready
StepResult at once. Each round pushes one chunk of audio into each of `rows` open streams
(max_batch = rows, so the last push makes the batch due), waits until every stream has its
result event, then takes the events. Per round, in microseconds per row (median of rounds):

  push     accept_audio for every stream (queueing, the ready books)
  step     from the last push to the last result emitted: batch choice, the plan's rows, the
           engine's own time (reported apart as `engine`, subtracted here), scatter to streams
  take     take_event for every stream

One of four rows gets a token per step (about what a real model's 2-7 encoder frames per
step give); the rest deliver progress only. The engine answers in columns where the build
has them (engines.api.ResultColumns, as engines.streaming_engine does); --row-results makes
it answer with StreamUpdate rows (as an engine worker's reply is unpacked today).

  python bench/batch_books_bench.py --rows 256,1024
  python bench/batch_books_bench.py --rows 256 --straddle   # every chunk split over two messages
  python bench/batch_books_bench.py --compare OLD_TREE,NEW_TREE --rows 256,1024 --repeats 3

--compare runs this script alternately against each tree (PYTHONPATH) in subprocesses, so the
two builds see the same machine noise; compare the ratio within one run.
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

import numpy as np


class NullEngine:
    """The contract's shape with no compute: every row advances one chunk; one row in four
    gets one token. Builds its results the cheapest way the contract allows."""

    def __init__(self, rows: int, columnar: bool = True):
        from tests.fake_engine import fake_geometry
        from engines.api import ModelInfo

        self.geometry = fake_geometry(160)
        self.capacity = rows
        self.max_batch = rows
        self.model_info = ModelInfo(name="null", lookahead_ms=160, lookaheads_ms=(160,), sample_rate=16000,
                                    vocabulary_size=2, random_weights=True, description="null")
        self._free = list(range(rows - 1, -1, -1))
        self.executions_n = 0
        self.engine_seconds = 0.0
        self.columnar = columnar  # results as columns where the build has them (else StreamUpdate rows)

    def acquire_slot(self) -> int:
        return self._free.pop()

    def release_slot(self, slot: int) -> None:
        self._free.append(slot)

    def slots_in_use(self) -> int:
        return self.capacity - len(self._free)

    def executions(self) -> dict[str, int]:
        return {"null": self.executions_n}

    def warmup(self) -> str:
        self.executions_n += 1
        return "null"

    def step(self, plan):
        from engines import api

        if self.columnar and hasattr(api, "ResultColumns"):
            return self._columnar_step(plan)
        from engines.api import StepResult, StreamUpdate, TokenEvent

        t0 = time.perf_counter()
        g = self.geometry
        updates = []
        token = (TokenEvent(0, "\u2581a", 0),)
        k = self.executions_n
        if hasattr(plan, "from_columns"):  # a columnar plan: the rows without a ChunkWork each
            rows = zip(plan.stream_ids, plan.slots.tolist())
        else:
            rows = ((c.stream_id, c.slot) for c in plan.chunks)
        for sid, slot in rows:
            tokens = token if (slot + k) % 4 == 0 else ()
            updates.append(StreamUpdate(stream_id=sid, slot=slot, tokens=tokens,
                                        text_delta=" a" if tokens else "", is_final=False,
                                        frames_decoded=k * g.encoder_frames, audio_seconds=0.16 * k))
        self.executions_n += 1
        result = StepResult(updates=tuple(updates), engine="null")
        self.engine_seconds += time.perf_counter() - t0
        return result

    def _columnar_step(self, plan):
        """The same result as columns (engines.api.ResultColumns), as the real engine makes it."""
        from engines.api import ResultColumns, StepResult

        t0 = time.perf_counter()
        g = self.geometry
        k = self.executions_n
        slots = plan.slots
        n = slots.size
        has = (slots + k) % 4 == 0
        counts = has.astype(np.int64)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        t = int(offsets[-1])
        text = [""] * n
        for i in np.flatnonzero(has).tolist():
            text[i] = " a"
        cols = ResultColumns(stream_ids=plan.stream_ids, slots=slots.copy(), is_final=np.zeros(n, bool),
                             frames_decoded=np.full(n, k * g.encoder_frames, np.int64),
                             audio_seconds=np.full(n, 0.16 * k), text_delta=text, token_offsets=offsets,
                             token_ids=np.zeros(t, np.int64), token_pieces=["\u2581a"] * t,
                             token_frames=np.zeros(t, np.int64))
        self.executions_n += 1
        result = StepResult.from_columns(cols, "null")
        self.engine_seconds += time.perf_counter() - t0
        return result

    async def step_async(self, plan):
        return self.step(plan)


async def run_rows(rows: int, rounds: int, warm: int, columnar: bool = True, straddle: bool = False) -> dict:
    from server.scheduling.scheduler import Scheduler, SchedulerConfig, StreamListener

    engine = NullEngine(rows, columnar)
    sched = Scheduler(engine, SchedulerConfig(batch_wait_s=0.005, pipeline_depth=2, hang_timeout_s=0))
    await sched.start()
    await sched.warmup()

    class Count(StreamListener):
        def __init__(self):
            self.n, self.want, self.done = 0, 0, None

        def events_added(self, stream):
            self.n += 1
            if self.n >= self.want and self.done is not None and not self.done.done():
                self.done.set_result(None)

    counter = Count()
    sched.listener = counter
    handles = [sched.open_stream() for _ in range(rows)]
    g = engine.geometry
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(g.samples_needed(rounds + warm + 1)).astype(np.float32)
    out = {"push": [], "step": [], "take": [], "engine": []}
    loop = asyncio.get_running_loop()
    sent = 0
    for k in range(warm + rounds):
        # Each message ends on chunk k's boundary, or (--straddle) half a chunk past it, so that
        # every chunk spans two messages (a frontend forwarding all of its held audio did that).
        end = g.samples_needed(k) + (g.chunk_samples // 2 if straddle else 0)
        piece, sent = audio[sent:end], end
        counter.n, counter.want, counter.done = 0, rows, loop.create_future()
        e0 = engine.engine_seconds
        t0 = time.perf_counter()
        for h in handles:
            sched.accept_audio(h.state, piece)
        t1 = time.perf_counter()
        await counter.done
        t2 = time.perf_counter()
        for h in handles:
            event = sched.take_event(h.state)
            assert event is not None and event.chunk_index == k, event
        t3 = time.perf_counter()
        if k >= warm:
            eng = engine.engine_seconds - e0
            out["push"].append(t1 - t0)
            out["step"].append(t2 - t1 - eng)
            out["take"].append(t3 - t2)
            out["engine"].append(eng)
    for h in handles:
        h.close()
    await sched.stop()
    row = {"rows": rows}
    for name, values in out.items():
        row[name + "_us_per_row"] = round(1e6 * statistics.median(values) / rows, 2)
    row["scheduler_us_per_row"] = round(row["push_us_per_row"] + row["step_us_per_row"] + row["take_us_per_row"], 2)
    return row


def compare(trees: list[str], args) -> None:
    results: dict[str, list[dict]] = {t: [] for t in trees}
    for rep in range(args.repeats):
        for tree in (trees if rep % 2 == 0 else trees[::-1]):
            cmd = [sys.executable, os.path.abspath(__file__), "--rows", args.rows, "--rounds", str(args.rounds),
                   "--warm", str(args.warm), "--json-line", *(["--row-results"] if args.row_results else []),
                   *(["--straddle"] if args.straddle else [])]
            env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
            line = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[tree].extend(json.loads(line))
    print("| rows | build | push | step (batch + scatter) | take | scheduler us/row | engine (null) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in [int(r) for r in args.rows.split(",")]:
        base = None
        for tree in trees:
            rs = [r for r in results[tree] if r["rows"] == rows]
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "rows"}
            base = base or med["scheduler_us_per_row"]
            print(f"| {rows} | {tree} | {med['push_us_per_row']:.1f} | {med['step_us_per_row']:.1f} | "
                  f"{med['take_us_per_row']:.1f} | {med['scheduler_us_per_row']:.1f} | "
                  f"{med['engine_us_per_row']:.1f} | {med['scheduler_us_per_row'] / base:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="256,1024")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="--compare: runs per tree, alternating")
    ap.add_argument("--compare", default=None, help="comma-separated source trees to run alternately")
    ap.add_argument("--json-line", action="store_true", help="print the rows as one JSON line")
    ap.add_argument("--straddle", action="store_true",
                    help="messages end half a chunk past each chunk boundary: every chunk spans two messages")
    ap.add_argument("--row-results", action="store_true",
                    help="the engine answers with StreamUpdate rows (as an engine worker's reply is unpacked), "
                         "not columns (as engines.streaming_engine does, where the build has them)")
    args = ap.parse_args()
    if args.compare:
        compare(args.compare.split(","), args)
        return
    rows = [asyncio.run(run_rows(int(r), args.rounds, args.warm, not args.row_results, args.straddle)) for r in args.rows.split(",")]
    if args.json_line:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
