"""How many streams and how large a batch the engine takes when the user names neither
(`asr-server --max-streams auto --max-batch auto`, the defaults). Pure arithmetic on numbers
the factory measured (engines.factory): no torch here, so it is unit-tested with given figures.

On the CPU the slot count is the fixed default (EngineConfig's max_streams): the CPU serves a
handful of streams and the test suite relies on that number.

Batch (`--max-batch auto`) on a GPU: measured where the engine runs (engines.factory), at
start-up (on the CPU: EngineConfig's max_batch, unmeasured; engines.factory.MEASURE_BATCH_ON_CPU
says why). The fixed default GPU_MAX_BATCH is the floor; from it the factory times the whole engine
step as it is served (features, encoder, decoding, commit; the step's preparation on the host
timed apart, as the engine worker prepares a step while the one before it runs: the longer of the
two counts, StreamingEngine.measure_step_ms) on silent streams at doubling batches up to
MAX_AUTO_BATCH (and never above an explicit --max-streams, nor, with `--max-streams auto`, above
what the device memory holds with its step headroom), and keeps the largest batch whose step
takes at most STEP_BUDGET_FRACTION of the chunk's real-time period and that still buys
throughput: each doubling must carry at least MIN_DOUBLING_GAIN times the rows per millisecond
of the batch below it (choose_max_batch). With `--max-streams auto` a doubling must also let the
server carry more streams: a larger batch's step headroom takes slots, and the server carries the
lesser of its step's real-time streams, at SERVED_RATE_SHARE of the measured rate, and its slots
(BatchSizing.streams_carried). Only when
even the default is too slow does the batch go below it: halving, down to 1.
  GPU_MAX_BATCH = 256, the largest batch of the recorded capacity runs (bench/RESULTS.md: at
  the measured capacity of one H100, 1,728 streams at 160 ms, the mean batch was 171). The
  encoder step grows less than its rows on a large GPU (issue 17, fast-cudagraph on an H200: 6.8,
  11.1 and 19.8 ms at 256, 512 and 1,024 rows at 160 ms; 12.8, 23.3 and 44.9 ms at 560 ms), so
  larger batches are measured; whether they are taken is MIN_DOUBLING_GAIN's rule.
  MAX_AUTO_BATCH = 1,024: the largest batch measured; an explicit --max-batch may go higher.
  MIN_DOUBLING_GAIN = 1.05: a doubling is taken where it carries more rows per millisecond than
  the batch below it, by more than the measurement's noise. A batch only grows that large when
  the load needs it (the scheduler steps whatever is ready), and STEP_BUDGET_FRACTION bounds what
  its step adds to each row's latency, so a cap below the largest batch that still gains only
  lowers the capacity: the cap's rows per step time is the most a server carries. On one H100
  (bench/RESULTS.md, run 43: the Triton kernels, 0.6B fp16, 160 ms) max batch 1,024 carried
  4,096 streams of 60 s at p95 chunk latency 108 ms with a mean batch of 642, where 256 rows in
  11.6 ms (the start-up measurement) can carry at most 3,530 and 512 rows in 19-21 ms about
  3,900-4,300; the gains were 1.22x from 256 to 512 (the start-up measurement) and 1.16x from
  512 to 1,024 (bench/step_bench.py, run 42). The rule was 1.25 before the engine core (issue 17): then the scheduler's loop, not
  the step, bound at large batches (runs 20-21 and 29-30 on an H200: 512 carried fewer streams
  than 256), and the work outside the step grew with the rows.
  SERVED_RATE_SHARE = 0.85: the share of the measured step's real-time streams a server carries
  at its latency target, where a batch's rate is weighed against the slots its headroom leaves.
  Served, a step also carries what the probe's does not (the windows assembled from the sample
  ring, speech's longer decode, results to the frontends, the batch not always full), and the
  p95 target needs the engine short of fully busy. On H100s (bench/RESULTS.md, runs 52-55):
  at 560 ms, 256 rows measured 14.8 ms (9,686 streams) and served 8,000 but not 9,000 (0.83-0.93);
  at 160 ms, 1,024 rows measured 23.7-24.0 ms (6,833-6,907) and served 4,506 but not 5,400
  (0.65-0.79), and 512 rows measured 13.2 ms (6,206) and failed 4,956 (under 0.80). Taken whole
  (1.0), that 512 rows' rate beat the 5,990 slots beside 1,024 rows, and the server kept 512,
  which failed 4,956 streams, where 1,024 rows (with the slower launch before it) had held 4,506;
  at 0.85 the choices are 256 at 560 ms and 1,024 at 160 ms (any share between 0.81 and 0.96
  gives them). The rate-against-rate rule (MIN_DOUBLING_GAIN) compares two measurements alike
  and takes no share.
  STEP_BUDGET_FRACTION = 0.5: the scheduler keeps up to two steps in flight (its
  pipeline_depth), so a chunk that becomes ready just after a step was submitted waits for that
  step and the one queued behind it before its own; with each step at most half a chunk period,
  those two finish within one period, the streams keep up with real time, and the chunk's
  latency stays about one period. What is left of the period is room for the host's work (the
  event loop forming the batch, the frontends) and for speech, whose decode loop emits more
  symbols than the silence the measurement steps on.
  Out of memory at a batch while serving still lowers it (server.scheduling.step_batch and step_loop).
Streams (`--max-streams auto`) on a GPU: as many cache slots as fit in the device memory that is
  free once the model and the encoder engine (its CUDA graphs for every batch bucket included)
  are loaded, after a headroom, and never more than MAX_AUTO_STREAMS. The headroom:
    * HEADROOM_FRACTION of the device's total memory, for what start-up has not allocated yet:
      the decode loop's CUDA graphs (captured in the warm-up, one per bucket), cuBLAS/cuDNN
      workspaces, the caching allocator's fragmentation, another process's growth;
    * what the engine itself holds beyond its slots at the largest batch. Where `--max-batch
      auto` measured the step (engines.factory.measure_max_batch), that is measured: the most
      device memory a probe engine of that many rows held at once while it stepped (its feature
      graphs, buffers and each step's intermediates), less its slots, times ENGINE_BYTES_MARGIN
      (the server keeps two steps in flight; speech's decode emits more symbols than the
      silence the probe steps on). A margin of 1 was tried (bench/RESULTS.md, run 57, one
      H100): the start-up's own timing then found the device within 0.7-3.3 GiB of full, and
      4,506 streams at 160 ms ran at p95 chunk latency 7.3 s where the same host with 2 gave
      0.7 s. Elsewhere, the rule from before the kernels:
      STEP_STATE_COPIES slots' worth of state per row of the largest batch (a step that gathers
      its rows' state out of the pool, the encoder and the decoder writing new state beside it,
      the pool taking it back only after the step succeeded: about three copies at once, one
      more for the intermediates). With the Triton kernels the attention cache, 99% of a slot,
      is read and written where it lies in the pool, so that rule kept about 28 GiB of an H100
      for copies no step makes: at 560 ms, 5,775 slots where the streams admitted ran at p95
      chunk latency 165 ms (bench/RESULTS.md, run 48: memory, not the step, was the limit).
  The cap, where `--max-batch auto` measured the step: SLOTS_PER_STEP_CAPACITY times the
  real-time streams that step carries at the chosen batch, one step after another (batch x
  chunk period / step time; realtime_cap). Beyond what the step can carry, memory is not what
  limits a server, and slots would only admit streams that cannot be served in real time, to
  the cost of every other stream; refused instead (RESOURCE_EXHAUSTED), a stream goes to
  another server. The factor is 2: the cap guards against slots far past what the step can
  carry; it is not the capacity (runs 52-55 served 0.65-0.93 of the measured step's streams).
  On an H200 at 160 ms (256 rows in 13.6 ms) that is 6,000
  slots, where the capacity runs carried 2,400-3,140; at 560 ms it lets memory decide (issue 17
  asks for 8,000 streams there).
  A named `--max-batch N` beside `--max-streams auto` on a GPU is kept as named, and its step is
  measured the same way (one probe engine of N rows: engines.factory.measure_named_batch), so the
  cap and the headroom come from its own step; before, the tuned flags of run 47 (`--max-batch
  1024`) got the fixed cap below, 4,608 slots, where the defaults got theirs from the step.
  MAX_AUTO_STREAMS (4,608, the slot count of the earlier capacity runs) is the cap where no step
  was measured (the TensorRT engine, or the probe could not run), and MAX_AUTO_SLOTS (16,384) the most slots
  `auto` takes whatever the step: a small model's step carries tens of thousands of streams on
  paper, where the host's per-stream work binds long before (each slot also holds host arrays,
  2 s of its audio in the sample ring among them). An explicit `--max-streams` may go higher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

GPU_MAX_BATCH = 256
MAX_AUTO_BATCH = 1024
STEP_BUDGET_FRACTION = 0.5
MIN_DOUBLING_GAIN = 1.05
SERVED_RATE_SHARE = 0.85
MAX_AUTO_STREAMS = 4608
SLOTS_PER_STEP_CAPACITY = 2.0
MAX_AUTO_SLOTS = 16384
UNMEASURED_CAP_REASON = f"the fixed cap for an unmeasured step ({MAX_AUTO_STREAMS})"
HEADROOM_FRACTION = 0.10
STEP_STATE_COPIES = 4
ENGINE_BYTES_MARGIN = 2.0

GIB = float(1 << 30)
MIB = float(1 << 20)


@dataclass(frozen=True)
class StreamSizing:
    """The decision for `--max-streams auto` on a GPU, with the figures it came from (logged at
    start-up and carried in the engine's start-up report)."""

    max_streams: int          # 0: not even one stream fits
    free_bytes: int           # device memory free for us after the model and engine loaded
    total_bytes: int
    per_stream_bytes: int     # one cache slot: encoder caches, mel cache, decoder and endpointer state
    max_batch: int
    headroom_bytes: int
    fits_in_memory: int       # slots the memory would hold, before the cap
    cap: int
    cap_reason: str = UNMEASURED_CAP_REASON
    engine_bytes: int | None = None  # measured: what the engine holds beside its slots (None: the copies rule)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        limit = "the cap" if self.fits_in_memory > self.cap else "device memory"
        if self.engine_bytes is None:
            step = f"{STEP_STATE_COPIES} copies of a slot per row"
        else:
            step = (f"{ENGINE_BYTES_MARGIN:g}x the {self.engine_bytes / GIB:.2f} GiB a probe engine of "
                    f"{self.max_batch} rows held beside its slots while stepping")
        return (f"{self.max_streams} streams (limited by {limit}): {self.free_bytes / GIB:.1f} GiB free of "
                f"{self.total_bytes / GIB:.1f} GiB, {self.per_stream_bytes / MIB:.2f} MiB per stream, "
                f"{self.headroom_bytes / GIB:.1f} GiB kept for the step at batch {self.max_batch} ({step}) and the "
                f"rest of start-up; {self.fits_in_memory} would fit, cap {self.cap}: {self.cap_reason}")


def auto_max_batch(on_gpu: bool, cpu_default: int, max_streams: int | None = None) -> int:
    """The fixed default batch cap for `--max-batch auto`, the floor of the measured choice (and
    the choice itself where nothing is measured). `max_streams`: an explicit slot count (a batch
    never holds more rows than there are streams); None when it is automatic too."""
    default = GPU_MAX_BATCH if on_gpu else cpu_default
    return default if max_streams is None else max(1, min(default, max_streams))


@dataclass(frozen=True)
class BatchSizing:
    """The decision for `--max-batch auto`, with the figures it came from (printed at start-up and
    carried in the engine's start-up report)."""

    max_batch: int
    default: int              # the fixed default: the floor unless even it is too slow
    limit: int                # the largest batch tried: MAX_AUTO_BATCH, explicit --max-streams, device memory
    chunk_ms: float           # the chunk's real-time period
    budget_ms: float          # STEP_BUDGET_FRACTION of it: the most a step may take
    measured: tuple[tuple[int, float | None], ...]  # (batch, step ms) in the order measured; None: it did not run
    # (batch, device bytes its probe engine held beyond its slots at most, while stepping): on a
    # GPU, what the serving engine needs beside its slots (streams_for_memory's headroom)
    engine_bytes: tuple[tuple[int, int], ...] = ()
    # True: the batch was named (`--max-batch N`), not chosen; its step was measured only so that
    # `--max-streams auto` sizes the slots as for a chosen batch (engines.factory.measure_named_batch)
    named: bool = False
    # (batch, slots the device memory holds beside a step of that many rows): with `--max-streams
    # auto` on a GPU, where a larger batch's headroom takes slots (choose_max_batch's `slots_at`)
    slots: tuple[tuple[int, int], ...] = ()

    def as_dict(self) -> dict:
        d = asdict(self)
        d["measured"] = [[b, ms] for b, ms in self.measured]
        d["engine_bytes"] = [[b, n] for b, n in self.engine_bytes]
        d["slots"] = [[b, n] for b, n in self.slots]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BatchSizing:
        return cls(**{**d, "measured": tuple((int(b), None if ms is None else float(ms)) for b, ms in d["measured"]),
                      "engine_bytes": tuple((int(b), int(n)) for b, n in d.get("engine_bytes", ())),
                      "slots": tuple((int(b), int(n)) for b, n in d.get("slots", ()))})

    def engine_bytes_at(self, batch: int) -> int | None:
        """What the probe engine of `batch` rows held beyond its slots; None where not measured."""
        return dict(self.engine_bytes).get(batch)

    def _next_measured(self) -> tuple[int, float] | None:
        """The next batch above the choice, measured and within the step budget; None if none."""
        times = dict(self.measured)
        above = [b for b, _ in self.measured if b > self.max_batch]
        if not above or times.get(self.max_batch) is None:
            return None
        nxt = min(above)
        ms = times[nxt]
        return (nxt, ms) if ms is not None and ms <= self.budget_ms else None

    def _next_gains_too_little(self) -> bool:
        nxt = self._next_measured()
        return nxt is not None and not gains_enough(self.max_batch, dict(self.measured)[self.max_batch], *nxt)

    def streams_carried(self, batch: int) -> float | None:
        """The most streams a server of this max batch carries by what was measured: the
        real-time streams its step carries at SERVED_RATE_SHARE of the measured rate, or the
        slots beside it where fewer; None unmeasured."""
        ms = dict(self.measured).get(batch)
        if not ms:
            return None
        carried = SERVED_RATE_SHARE * batch * self.chunk_ms / ms
        slots = dict(self.slots).get(batch)
        return carried if slots is None else min(carried, float(slots))

    def describe(self) -> str:
        steps = ", ".join(f"{b}: {'did not run' if ms is None else f'{ms:.1f} ms'}" for b, ms in self.measured)
        if self.named:
            return (f"max batch {self.max_batch} (named), its step measured for the slots: step time by batch {steps}; "
                    f"the chunk is {self.chunk_ms:.0f} ms")
        if self.max_batch >= self.limit:
            why = f"the limit {self.limit} fits"
        elif self.max_batch < self.default:
            why = f"below the default {self.default}: it is too slow"
        elif self._next_gains_too_little():
            why = (f"the next batch gains too little throughput (less than {MIN_DOUBLING_GAIN:g}x the rows "
                   f"per ms a doubling; limit {self.limit})")
        elif (nxt := self._next_measured()) is not None and nxt[0] in dict(self.slots):
            here, there = self.streams_carried(self.max_batch), self.streams_carried(nxt[0])
            why = (f"the next batch's headroom leaves fewer streams: {dict(self.slots)[nxt[0]]} slots beside a step "
                   f"of {nxt[0]} rows, at most {there:.0f} streams against {here:.0f}; limit {self.limit}")
        else:
            why = f"the next batch is too slow (limit {self.limit})"
        return (f"max batch {self.max_batch} ({why}): step time by batch {steps}; a step may take "
                f"{self.budget_ms:.1f} ms, {STEP_BUDGET_FRACTION:g} of the {self.chunk_ms:.0f} ms chunk")


def batch_limit(default: int, max_streams: int | None = None, memory_limit: int | None = None) -> int:
    """The largest batch `--max-batch auto` tries: MAX_AUTO_BATCH, never above an explicit slot
    count, nor above what the device memory holds (`memory_limit`, batch_memory_limit) unless the
    default itself is above that (the memory only stops the growth: the default stays what it
    was)."""
    limit = MAX_AUTO_BATCH if max_streams is None else max(1, min(MAX_AUTO_BATCH, max_streams))
    if memory_limit is not None:
        limit = max(min(limit, default), min(limit, memory_limit))
    return limit


def batch_memory_limit(free_bytes: int, total_bytes: int, per_stream_bytes: int, limit: int = MAX_AUTO_BATCH) -> int:
    """With `--max-streams auto`: the largest batch up to `limit` whose step headroom still
    leaves slots for a full batch (streams_for_memory with that batch holds at least as many
    streams as the batch has rows); 0 when not even one does."""
    best = 0
    for b in sorted({1 << k for k in range(limit.bit_length())} | {limit}):
        if streams_for_memory(free_bytes, total_bytes, per_stream_bytes, b).fits_in_memory >= b:
            best = b
    return best


def batch_candidates(default: int, limit: int) -> tuple[int, ...]:
    """The batches measured upwards: the default, doubling, and the limit itself (a limit below
    the default is the only one)."""
    if default >= limit:
        return (limit,)
    out, b = [], default
    while b < limit:
        out.append(b)
        b *= 2
    return (*out, limit)


def gains_enough(batch: int, ms: float, larger: int, larger_ms: float, gain: float = MIN_DOUBLING_GAIN) -> bool:
    """Whether `larger` rows in `larger_ms` carry at least `gain` times the rows per ms of `batch`
    rows in `ms`, per doubling (a step from 512 to 700 rows needs gain ** log2(700 / 512))."""
    if ms <= 0:
        return False
    need = gain ** math.log2(larger / batch)
    return (larger / larger_ms) >= need * (batch / ms) if larger_ms > 0 else True


def choose_max_batch(default: int, limit: int, chunk_ms: float, step_ms: Callable[[int], float | None],
                     fraction: float = STEP_BUDGET_FRACTION,
                     slots_at: Callable[[int], int | None] | None = None) -> BatchSizing:
    """`--max-batch auto`: the largest candidate (batch_candidates) whose step, as `step_ms(batch)`
    measures it (None: the step could not run, e.g. out of memory), takes at most `fraction` of
    the chunk period and carries enough more rows per ms than the batch below it (gains_enough).
    Measured upwards, stopping at the first that does not fit or does not gain (a step does not
    get cheaper per row with more rows once it stopped); when even the first does not fit,
    halving down to the largest that does, and 1 when none does.

    `slots_at(batch)` (with `--max-streams auto` on a GPU; asked after that batch's step ran):
    the slots the device memory holds beside a step of that many rows. A larger batch's headroom
    takes slots, so a doubling is also refused where the server would carry no more streams
    with it: the lesser of the step's real-time streams and the slots (BatchSizing
    .streams_carried) must grow. On an H100 at 560 ms the slots beside 512 rows (about 7,900)
    were already below what the step carries; 1,024 rows would have left about 5,800."""
    if default < 1 or limit < 1 or chunk_ms <= 0 or not 0 < fraction <= 1:
        raise ValueError(f"bad figures: default {default}, limit {limit}, chunk {chunk_ms} ms, fraction {fraction}")
    budget = fraction * chunk_ms
    measured: list[tuple[int, float | None]] = []
    slots: list[tuple[int, int]] = []

    def fits(batch: int) -> bool:
        ms = step_ms(batch)
        measured.append((batch, None if ms is None else float(ms)))
        if ms is not None and slots_at is not None:
            n = slots_at(batch)
            if n is not None:
                slots.append((batch, int(n)))
        return ms is not None and ms <= budget

    def sizing(chosen: int) -> BatchSizing:
        return BatchSizing(max_batch=max(chosen, 1), default=default, limit=limit, chunk_ms=float(chunk_ms),
                           budget_ms=budget, measured=tuple(measured), slots=tuple(slots))

    chosen = 0
    ups = batch_candidates(default, limit)
    for b in ups:
        if not fits(b):
            break
        if chosen and not gains_enough(chosen, measured[-2][1], b, measured[-1][1]):
            break
        if chosen and slots_at is not None:
            so_far = sizing(chosen)
            if so_far.streams_carried(b) <= so_far.streams_carried(chosen):
                break
        chosen = b
    b = ups[0] // 2
    while not chosen and b >= 1:
        if fits(b):
            chosen = b
        b //= 2
    return sizing(chosen)


def realtime_cap(batch_sizing: BatchSizing | None) -> tuple[int, str]:
    """The slot cap for `--max-streams auto` and why: SLOTS_PER_STEP_CAPACITY times the
    real-time streams the measured step carries at the chosen batch (never below that batch,
    never above MAX_AUTO_SLOTS); MAX_AUTO_STREAMS where the step was not measured (see the
    module docstring)."""
    ms = dict(batch_sizing.measured).get(batch_sizing.max_batch) if batch_sizing is not None else None
    if not ms:
        return MAX_AUTO_STREAMS, UNMEASURED_CAP_REASON
    carried = batch_sizing.max_batch * batch_sizing.chunk_ms / ms
    cap = max(batch_sizing.max_batch, int(SLOTS_PER_STEP_CAPACITY * carried))
    why = (f"{SLOTS_PER_STEP_CAPACITY:g}x the {carried:.0f} real-time streams a step of "
           f"{batch_sizing.max_batch} rows in {ms:.1f} ms carries at {batch_sizing.chunk_ms:.0f} ms chunks")
    if cap > MAX_AUTO_SLOTS:
        return MAX_AUTO_SLOTS, f"the most slots auto takes ({MAX_AUTO_SLOTS}; {why})"
    return cap, why


def streams_for_memory(free_bytes: int, total_bytes: int, per_stream_bytes: int, max_batch: int, *,
                       cap: int = MAX_AUTO_STREAMS, headroom_fraction: float = HEADROOM_FRACTION,
                       step_copies: int = STEP_STATE_COPIES, cap_reason: str | None = None,
                       engine_bytes: int | None = None) -> StreamSizing:
    """Slots for `--max-streams auto` on a GPU (see the module docstring for the headroom).
    `engine_bytes`: what a probe engine of `max_batch` rows held beyond its slots while it
    stepped (BatchSizing.engine_bytes_at); None: not measured, the copies rule holds."""
    if per_stream_bytes <= 0:
        raise ValueError(f"per-stream state must be positive, got {per_stream_bytes} bytes")
    if free_bytes < 0 or total_bytes <= 0 or max_batch < 1 or cap < 1 or (engine_bytes is not None and engine_bytes < 0):
        raise ValueError(f"bad figures: free {free_bytes}, total {total_bytes}, max batch {max_batch}, cap {cap}, "
                         f"engine bytes {engine_bytes}")
    if engine_bytes is None:
        step = step_copies * per_stream_bytes * max_batch
    else:
        step = int(ENGINE_BYTES_MARGIN * engine_bytes)
    headroom = int(headroom_fraction * total_bytes) + step
    fits = max(0, (free_bytes - headroom) // per_stream_bytes)
    return StreamSizing(max_streams=min(fits, cap), free_bytes=free_bytes, total_bytes=total_bytes,
                        per_stream_bytes=per_stream_bytes, max_batch=max_batch, headroom_bytes=headroom,
                        fits_in_memory=fits, cap=cap, engine_bytes=engine_bytes,
                        cap_reason=cap_reason or (UNMEASURED_CAP_REASON if cap == MAX_AUTO_STREAMS else f"the cap {cap}"))


# -- the decode's own CUDA stream (`--decode-stream auto`): timed by engines.decode_overlap ---------

# The decode stream is kept when every one of its timings (the slower repeat too) beats the
# better of one stream's by at least this factor; a smaller gain is within what repeats of one
# mode differ by (run 36: 3-10% at 160 ms) and does not pay for a second stream's moving parts.
# Why every repeat: on an H100 the decode stream's repeats swing (run 37, 160 ms, 256 rows: 9.98
# and 23.93 ms where one stream took 11.85 and 12.28; the start-up measurement at 512 rows said
# 0.96x in run 38 and 1.10x in run 40), and a wrong "on" costs far more (0.45-0.59x in run 37)
# than a wrong "off" (at most the 1.17-1.19x of runs 36-37).
MIN_DECODE_STREAM_GAIN = 1.03


@dataclass(frozen=True)
class DecodeStreamChoice:
    """The start-up's decision and what it rests on. `one_stream_ms` and `decode_stream_ms` are
    the pipelined step times of each repeat (empty when nothing was measured)."""

    on: bool
    reason: str
    rows: int = 0
    one_stream_ms: tuple[float, ...] = ()
    decode_stream_ms: tuple[float, ...] = ()

    @property
    def speedup(self) -> float | None:
        if not self.one_stream_ms or not self.decode_stream_ms:
            return None
        return min(self.one_stream_ms) / min(self.decode_stream_ms)

    @property
    def worst_speedup(self) -> float | None:
        """The better repeat of one stream over the slower repeat of the decode stream: what
        the choice rests on."""
        if not self.one_stream_ms or not self.decode_stream_ms:
            return None
        return min(self.one_stream_ms) / max(self.decode_stream_ms)

    def as_dict(self) -> dict:
        return {"on": self.on, "reason": self.reason, "rows": self.rows,
                "one_stream_ms": list(self.one_stream_ms), "decode_stream_ms": list(self.decode_stream_ms)}

    @classmethod
    def from_dict(cls, d: dict) -> DecodeStreamChoice:
        return cls(on=bool(d["on"]), reason=str(d["reason"]), rows=int(d.get("rows", 0)),
                   one_stream_ms=tuple(d.get("one_stream_ms", ())), decode_stream_ms=tuple(d.get("decode_stream_ms", ())))

    def describe(self) -> str:
        state = "on" if self.on else "off"
        if self.speedup is None:
            return f"{state} ({self.reason})"
        slower = (f"; its slower repeat {max(self.decode_stream_ms):.2f} ms, {self.worst_speedup:.2f}x"
                  if len(self.decode_stream_ms) > 1 else "")
        return (f"{state} ({self.reason}): a pipelined step of {self.rows} rows took "
                f"{min(self.decode_stream_ms):.2f} ms with it and {min(self.one_stream_ms):.2f} ms without, "
                f"{self.speedup:.2f}x{slower} (kept from {MIN_DECODE_STREAM_GAIN:.2f}x in every repeat)")


def decide_decode_stream(one_stream_ms: list[float], decode_stream_ms: list[float], rows: int,
                         min_gain: float = MIN_DECODE_STREAM_GAIN) -> DecodeStreamChoice:
    """The decode stream if even its slower repeat gains min_gain over the better repeat of one
    stream (MIN_DECODE_STREAM_GAIN says why every repeat)."""
    gain = min(one_stream_ms) / min(decode_stream_ms)
    worst = min(one_stream_ms) / max(decode_stream_ms)
    on = worst >= min_gain
    if on:
        why = "measured: faster with a decode stream"
    elif gain < 1:
        why = "measured: slower with a decode stream"
    elif gain >= min_gain:
        why = "measured: unsteady with a decode stream, a repeat gained too little or lost"
    else:
        why = "measured: too little gain for a second stream"
    return DecodeStreamChoice(on=on, reason=why, rows=rows, one_stream_ms=tuple(one_stream_ms),
                              decode_stream_ms=tuple(decode_stream_ms))
