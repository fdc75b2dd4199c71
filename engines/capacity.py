"""How many streams and how large a batch the engine takes when the user names neither
(`asr-server --max-streams auto --max-batch auto`, the defaults). Pure arithmetic on numbers
the factory measured (engines.factory): no torch here, so it is unit-tested with given figures.

On the CPU the answers are the fixed defaults (EngineConfig's max_streams and max_batch): the
CPU serves a handful of streams and the test suite relies on those numbers.

On a GPU:
- Batch: GPU_MAX_BATCH, the largest batch of every recorded capacity run (bench/RESULTS.md:
  `--max-batch 256`; at the measured capacity of one H100, 1,728 streams at 160 ms, the mean
  batch was 171, so a cap of 32 would have held it far below). A step at 256 takes 20.6 ms at
  160 ms and 35.2 ms at 560 ms (fast-cudagraph, 0.6B), 13% and 6% of the chunk it serves, so no
  GPU we measured needs a smaller cap for time; out of memory at a batch lowers it while
  serving (server.scheduling.scheduler). Never more than the slots there are.
- Streams: as many cache slots as fit in the device memory that is free once the model and
  the encoder engine (its CUDA graphs for every batch bucket included) are loaded, after a
  headroom, and never more than MAX_AUTO_STREAMS. The headroom:
    * HEADROOM_FRACTION of the device's total memory, for what start-up has not allocated yet:
      the decode loop's CUDA graphs (captured in the warm-up, one per bucket), cuBLAS/cuDNN
      workspaces, the caching allocator's fragmentation, another process's growth;
    * STEP_STATE_COPIES slots' worth of state per row of the largest batch: a step gathers its
      rows' state out of the pool, the encoder and the decoder write new state beside it, and
      the pool takes it back only after the step succeeded (compute-then-commit), so a batch
      holds about three copies of its rows' state at once; one more for the intermediates.
  MAX_AUTO_STREAMS: the slot count of the capacity runs (4,608), above the most real-time
  streams one GPU carried in any recorded run (3,456 at 560 ms on an H100). Beyond it, memory
  is not what limits a server: the GPU's step time and the host are, and unused slots would
  only admit streams that cannot be served in real time. An explicit `--max-streams` may go
  higher.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GPU_MAX_BATCH = 256
MAX_AUTO_STREAMS = 4608
HEADROOM_FRACTION = 0.10
STEP_STATE_COPIES = 4

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

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        limit = "the cap" if self.fits_in_memory > self.cap else "device memory"
        return (f"{self.max_streams} streams (limited by {limit}): {self.free_bytes / GIB:.1f} GiB free of "
                f"{self.total_bytes / GIB:.1f} GiB, {self.per_stream_bytes / MIB:.2f} MiB per stream, "
                f"{self.headroom_bytes / GIB:.1f} GiB kept for the step at batch {self.max_batch} and the rest "
                f"of start-up; {self.fits_in_memory} would fit, cap {self.cap}")


def auto_max_batch(on_gpu: bool, cpu_default: int, max_streams: int | None = None) -> int:
    """The batch cap for `--max-batch auto`. `max_streams`: an explicit slot count (a batch
    never holds more rows than there are streams); None when it is automatic too."""
    if not on_gpu:
        return cpu_default
    return GPU_MAX_BATCH if max_streams is None else max(1, min(GPU_MAX_BATCH, max_streams))


def streams_for_memory(free_bytes: int, total_bytes: int, per_stream_bytes: int, max_batch: int, *,
                       cap: int = MAX_AUTO_STREAMS, headroom_fraction: float = HEADROOM_FRACTION,
                       step_copies: int = STEP_STATE_COPIES) -> StreamSizing:
    """Slots for `--max-streams auto` on a GPU (see the module docstring for the headroom)."""
    if per_stream_bytes <= 0:
        raise ValueError(f"per-stream state must be positive, got {per_stream_bytes} bytes")
    if free_bytes < 0 or total_bytes <= 0 or max_batch < 1 or cap < 1:
        raise ValueError(f"bad figures: free {free_bytes}, total {total_bytes}, max batch {max_batch}, cap {cap}")
    headroom = int(headroom_fraction * total_bytes) + step_copies * per_stream_bytes * max_batch
    fits = max(0, (free_bytes - headroom) // per_stream_bytes)
    return StreamSizing(max_streams=min(fits, cap), free_bytes=free_bytes, total_bytes=total_bytes,
                        per_stream_bytes=per_stream_bytes, max_batch=max_batch, headroom_bytes=headroom,
                        fits_in_memory=fits, cap=cap)
