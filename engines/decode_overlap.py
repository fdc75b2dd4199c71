"""Whether a step's decode runs on a CUDA stream of its own (`--decode-stream auto`), chosen at
start-up by timing the engine's steps both ways, pipelined as the engine worker runs them.

With a decode stream the next step's features, gather and encoder are queued as soon as the
current step's encoder is (StreamingEngine.next_at QUEUED) and run while it decodes; without
one the next step waits until the decode and commit are done (DEVICE_DONE). Which is faster
depends on the model, the lookahead, the batch and the card: on an H100 the decode stream made
the steps 1.17x as frequent at 160 ms and 256 rows, and 0.58x at 560 ms and 256 rows
(bench/RESULTS.md, run 36). So the server does not guess: it times both at its own batch and
keeps the faster, and the decode stream only where it gains clearly
(engines.capacity.decide_decode_stream, pure arithmetic on the times measured here).

The same pipelined stepping serves bench/pipeline_bench.py, which reports the two modes side by
side at several batches.
"""

from __future__ import annotations

import time

import numpy as np

from engines.api import QUEUED, StepPlan
from engines.capacity import MIN_DECODE_STREAM_GAIN, DecodeStreamChoice, decide_decode_stream
from engines.models import speechlike_audio
from engines.sample_ring import RingSamples, SampleRing

# What the start-up measurement steps: the first chunk of each set of streams and one middle
# chunk untimed (caches filled, any graph a shape needs captured), then TIMED_STEPS steps per
# mode, the modes alternated REPEATS times (about 60 steps: under a second at 160 ms and 256
# rows on an H100, ~5 s at 560 ms and 1,024 rows).
UNTIMED_STEPS = 4
TIMED_STEPS = 10
REPEATS = 2
# Distinct clips the measured streams read (row i reads clip i % CLIPS): the ring holds these
# only, not one clip per stream (1,024 rows at 560 ms would need ~0.7 GB of host memory).
CLIPS = 16


def run_pipelined(engine, plans: list[StepPlan]) -> tuple[float, float, list]:
    """The plans, two in flight as the engine worker runs them (server/runtime/worker_process.py
    `finish_step`): the next plan prepared while the current step runs, its device work begun at the
    stage the engine names (`next_at`). Returns (seconds, this thread's CPU seconds, each step's
    tokens per row). The CPU seconds are the host work a worker thread does for these steps; on
    CUDA they include the waits for the device, which the runtime spends spinning by default:
    well under the seconds, they show the host has room; equal, they show nothing."""
    early = engine.next_at == QUEUED
    out = []
    engine.synchronize()
    t0, c0 = time.perf_counter(), time.thread_time()
    current = engine.start_step(plans[0])
    current.advance()
    for i in range(len(plans)):
        nxt = None
        prepared = engine.prepare(plans[i + 1]) if i + 1 < len(plans) else None  # read ahead
        if early and prepared is not None:
            nxt = engine.start_step(prepared)
            nxt.advance()
        current.advance()  # decode and commit queued
        if nxt is None and prepared is not None:
            nxt = engine.start_step(prepared)
            nxt.advance()
        while current.advance():
            pass
        out.append([u.tokens for u in current.result.updates])
        current = nxt
    engine.synchronize()
    return time.perf_counter() - t0, time.thread_time() - c0, out


def timing_clips(engine, steps: int, clips: int = CLIPS, seed: int = 9000) -> SampleRing:
    """`clips` distinct speech-like clips in a ring of their own, each long enough for a stream
    that runs in every other one of `steps` steps (and one chunk more, so that no step is a
    stream's last)."""
    g = engine.geometry
    n = g.samples_needed(steps // 2 + 2)
    ring = SampleRing.local(clips, n)
    for i in range(clips):
        ring.write(i, 0, speechlike_audio(n / g.sample_rate + 0.1, seed=seed + i)[:n])
    return ring


def pipelined_plans(engine, ring: SampleRing, rows: int, steps: int) -> tuple[list[StepPlan], list[int]]:
    """`steps` plans over two sets of `rows` fresh streams, alternating (a stream in every other
    step, as the worker's two steps in flight hold different streams). Stream r reads ring row
    r % ring.slots: each row's audio is a span of a sample ring, as the engine worker's steps
    name spans of the ring the frontends write (engines.sample_ring), so the host work is the
    worker's. Returns the plans and the slots they hold (the caller releases them)."""
    g = engine.geometry
    n = ring.width
    slots = [engine.acquire_slot() for _ in range(2 * rows)]
    plans = []
    try:
        for i in range(steps):
            k = i // 2
            streams = np.arange(rows) + (0 if i % 2 == 0 else rows)
            start, end = g.chunk_span(k, n, False)
            row_slots = np.array([slots[r] for r in streams], dtype=np.int64)
            samples = RingSamples(ring, streams % ring.slots, np.full(rows, start), np.full(rows, end))
            flags = np.zeros(rows, dtype=bool)
            plans.append(StepPlan.from_columns([f"s{r}" for r in streams], row_slots, samples, flags | (k == 0),
                                               flags, flags))
    except BaseException:
        for slot in slots:
            engine.release_slot(slot)
        raise
    return plans, slots


def time_mode(engine, ring: SampleRing, rows: int, on: bool, timed_steps: int = TIMED_STEPS,
              untimed_steps: int = UNTIMED_STEPS) -> tuple[float, float, list]:
    """One mode's pipelined steps: (seconds a step, host CPU seconds a step, tokens per step)."""
    engine.set_decode_stream(on)
    plans, slots = pipelined_plans(engine, ring, rows, untimed_steps + timed_steps)
    try:
        run_pipelined(engine, plans[:untimed_steps])  # first chunks, caches filled
        took, used, out = run_pipelined(engine, plans[untimed_steps:])
    finally:
        for slot in slots:
            engine.release_slot(slot)
    return took / timed_steps, used / timed_steps, out


def measure_decode_stream(engine, rows: int, timed_steps: int = TIMED_STEPS, repeats: int = REPEATS,
                          min_gain: float = MIN_DECODE_STREAM_GAIN) -> DecodeStreamChoice:
    """Times the engine's pipelined steps of `rows` streams with and without its decode stream,
    alternating, and leaves the engine in the faster mode (the decision returned). Needs 2 x rows
    free slots (two steps in flight hold different streams)."""
    free = engine.capacity - engine.slots_in_use()
    if rows < 1 or 2 * rows > free:
        raise ValueError(f"timing {rows} rows needs {2 * rows} free slots; {free} are free")
    ring = timing_clips(engine, UNTIMED_STEPS + timed_steps)
    ms: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(repeats):
            for on in (True, False):
                seconds, _, _ = time_mode(engine, ring, rows, on, timed_steps)
                ms[on].append(round(1e3 * seconds, 3))
    except BaseException:
        engine.set_decode_stream(False)
        raise
    choice = decide_decode_stream(ms[False], ms[True], rows, min_gain)
    engine.set_decode_stream(choice.on)
    return choice
