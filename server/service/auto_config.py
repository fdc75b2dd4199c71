"""`asr-server`'s `auto` defaults that the server process decides: the sizing flags' parsing,
and how many gRPC frontend processes to run. Pure functions on given numbers (plus two small
readers of the machine, kept apart), unit-tested in tests/test_auto_config.py. The engine's own
sizing (slots from device memory, the batch cap from the step's measured time) is decided where
the device is, in the engine process: engines/capacity.py.

Frontends (`--frontends auto`): on the CPU, 1 (everything in one process, as before: a CPU
engine carries a handful of streams, far below what one event loop answers). On a GPU, one
frontend per CORES_PER_FRONTEND usable cores after ENGINE_CORES, at least 1, at most
MAX_AUTO_FRONTENDS. The figures (bench/RESULTS.md):
  - ENGINE_CORES = 2: in the H100 run 19 the engine worker used 0.83 of a core and the parent's
    event loop (the scheduler) 0.64; each must have a core of its own, or a step waits for the
    CPU.
  - CORES_PER_FRONTEND = 2: a frontend's event loop carries up to about 800 streams of 160 ms
    on a core (H100 run 34: 0.89 of a core at 821 streams, 0.94-0.95 at 871-995 where the level
    failed); gRPC's completion-queue thread and the kernel's network work for its connections
    come on top of the loop, so each frontend gets two cores' worth of room.
  - MAX_AUTO_FRONTENDS = 6: since the frontends write their audio into the engine's sample ring
    (runs 34-35) the parent's loop is at 0.4 of a core at 3,000 streams, and what a frontend
    costs it is one small message a loop iteration; the frontends became a limit (four of them
    at 0.94-0.95 of a core where run 34's 3,102 streams failed), and six carried the best
    capacity measured (run 35: 3,140 streams, the busiest frontend at 0.79). Before the ring (H200
    runs 32-33) 7 frontends did no better than 4, when the parent's loop bound.
  - MAX_AUTO_FRONTENDS = 8 since run 38 (one H100, default flags: 3,466 streams at 160 ms with
    six): the busiest frontend's loop was at 0.87 of a core there and 0.92 at the failing 3,632,
    the parent's at 0.44. The kernel spreads connections over the frontends unevenly (721 against
    433 streams there), so at issue 17's 4,000 streams the busiest of six would need about a
    whole core; a 16-core host now gets (16 - 2) // 2 = 7. Not yet measured with seven.
CPU counts are the cores this process may run on (its affinity) and, where a cgroup (v2) CPU
quota is lower (a container's CPU limit), that quota.
"""

from __future__ import annotations

import argparse
import logging
import math
import os

from engines.capacity import (GPU_MAX_BATCH, MAX_AUTO_BATCH, MAX_AUTO_STREAMS, MIN_DOUBLING_GAIN, SLOTS_PER_STEP_CAPACITY,
                              STEP_BUDGET_FRACTION, BatchSizing, DecodeStreamChoice,
                              StreamSizing)
from engines.config import EngineConfig

log = logging.getLogger("nemostream.cli")
AUTO = "auto"
ENGINE_CORES = 2
CORES_PER_FRONTEND = 2
MAX_AUTO_FRONTENDS = 8
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"

# What `auto` means, for asr-server --help.
MAX_BATCH_HELP = (f"chunks per engine step; auto: on a GPU, measured at start-up: the largest batch up to "
                  f"{MAX_AUTO_BATCH} (never above --max-streams) whose step takes at most {STEP_BUDGET_FRACTION:g} "
                  f"of a chunk's duration and each doubling carries at least {MIN_DOUBLING_GAIN:g}x the rows per ms, not "
                  f"below {GPU_MAX_BATCH} unless even that is too slow (printed at start-up "
                  f"with its figures); {EngineConfig.max_batch} on the CPU (engines/capacity.py)")
MAX_STREAMS_HELP = (f"concurrent streams (cache slots); auto: on a GPU, as many as the device memory free after "
                    f"loading holds, less a headroom for the step at the largest batch, at most "
                    f"{SLOTS_PER_STEP_CAPACITY:g}x the real-time streams the step measured at start-up carries "
                    f"({MAX_AUTO_STREAMS} where it was not measured) (printed at start-up with its figures); "
                    f"{EngineConfig.max_streams} on the CPU (engines/capacity.py)")
FRONTENDS_AUTO_HELP = (f"auto: with the engine on a GPU, one per {CORES_PER_FRONTEND} usable cores after "
                       f"{ENGINE_CORES} for the engine (and 1 more per further engine core), 1 to {MAX_AUTO_FRONTENDS} per "
                       f"engine core; with the engine on the CPU, 1 "
                       f"(server/service/auto_config.py)")


def int_or_auto(text: str) -> int | None:
    """argparse type of the sizing flags: `auto` -> None, else the integer (range checks stay
    with whoever takes the value, so their messages do not change)."""
    if text.strip().lower() == AUTO:
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or {AUTO!r}, got {text!r}") from None


def engine_sizing_kwargs(max_streams: int | None, max_batch: int | None) -> dict:
    """EngineConfig's sizing fields from the flags: an explicit value is used as given; `auto`
    keeps the CPU figure (EngineConfig's default) and lets the factory size it on a GPU."""
    return {"max_streams": EngineConfig.max_streams if max_streams is None else max_streams,
            "auto_max_streams": max_streams is None,
            "max_batch": EngineConfig.max_batch if max_batch is None else max_batch,
            "auto_max_batch": max_batch is None}


def cgroup_cpu_limit(cpu_max: str | None) -> float | None:
    """Cores a cgroup v2 `cpu.max` ("QUOTA PERIOD", or "max PERIOD": no limit) allows; None
    when there is no limit or the text is not that."""
    if not cpu_max:
        return None
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cpus(affinity_cpus: int, cpu_max: str | None = None) -> int:
    """Cores this process can use: its affinity, lowered to a cgroup quota (rounded up: a quota
    of 2.5 cores still runs three busy processes part of the time)."""
    limit = cgroup_cpu_limit(cpu_max)
    cpus = max(1, affinity_cpus)
    return cpus if limit is None else max(1, min(cpus, math.ceil(limit)))


def auto_frontends(cpus: int, on_gpu: bool, engine_cores: int = 1) -> int:
    """`--frontends auto` (see the module docstring for the figures). With several engine cores
    (`--gpus`, `--engine-cores`) each core's worker needs a core of its own beside the parent's
    loop, and each carries its own share of streams, so both the reserve and the cap grow with
    them."""
    if not on_gpu:
        return 1
    reserved = ENGINE_CORES + (engine_cores - 1)
    return max(1, min(MAX_AUTO_FRONTENDS * engine_cores, (cpus - reserved) // CORES_PER_FRONTEND))


def read_usable_cpus() -> int:
    """usable_cpus() of this machine and process."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    try:
        with open(CGROUP_CPU_MAX) as f:
            cpu_max = f.read()
    except OSError:
        cpu_max = None
    return usable_cpus(affinity, cpu_max)


def engine_device(engine) -> str:
    """Where a started engine runs ("cpu", "cuda:0", ...), from its start-up report (a dict from
    an engine worker, an object in process); "" when it does not say (e.g. the test engines),
    which counts as the CPU."""
    report = getattr(engine, "startup_report", None)
    if isinstance(report, dict):
        return str(report.get("device") or "")
    return str(getattr(report, "device", "") or getattr(engine, "device", "") or "")


def reported(engine, field: str) -> dict | None:
    """One decision of the engine's start-up report with its figures (engines.factory
    StartupReport: a dict from an engine worker, an object in process), or None if it made none:
    "sizing" (`--max-streams auto`), "batch_sizing" (`--max-batch auto`, measured, or a named batch measured for the slots),
    "decode_stream" (`--decode-stream`, and the times when it measured)."""
    report = getattr(engine, "startup_report", None)
    value = report.get(field) if isinstance(report, dict) else getattr(report, field, None)
    return dict(value) if value else None


def sizing_text(sizing: dict) -> str:
    """reported(engine, "sizing")'s figures in words."""
    return StreamSizing(**sizing).describe()


def resolve_frontends(frontends: int | None, engine, max_streams_auto: bool, max_batch_auto: bool,
                      cpus: int | None = None, engine_cores: int = 1) -> tuple[int, list[str]]:
    """After the engine started: the frontend count (`frontends` None: auto) and the lines that
    say how the server was sized and from what (asr-server prints them)."""
    device = engine_device(engine)
    sizing = reported(engine, "sizing")
    batch_sizing = reported(engine, "batch_sizing")
    streams = str(engine.capacity)
    if max_streams_auto:
        streams += " (auto: from device memory)" if sizing else " (auto: the fixed default)"
    how = ""
    if frontends is None:
        cpus = read_usable_cpus() if cpus is None else cpus
        frontends = auto_frontends(cpus, device.startswith("cuda"), engine_cores)
        how = (f" (auto: {cpus} usable cores, {engine_cores} engine core{'s' if engine_cores > 1 else ''}, "
               f"engine on {device or 'a device it did not report'})")
    batch = ""
    if max_batch_auto:
        batch = " (auto: measured step time)" if batch_sizing else " (auto: the fixed default)"
    lines = [f"sizing: device {device or 'not reported'}, max streams {streams}, max batch {engine.max_batch}"
             f"{batch}, frontends {frontends}{how}"]
    if sizing:
        lines.append(f"max streams from device memory: {sizing_text(sizing)}")
        log.info("max streams sized from device memory", extra={"sizing": sizing})
    if batch_sizing:
        measured = BatchSizing.from_dict(batch_sizing)
        label = "the named batch's step" if measured.named else "max batch from the step time"
        lines.append(f"{label}: {measured.describe()}")
        log.info(label, extra={"batch_sizing": batch_sizing})
    decode_stream = reported(engine, "decode_stream")
    if decode_stream:
        lines.append(f"decode stream: {DecodeStreamChoice.from_dict(decode_stream).describe()}")
    details = reported(engine, "details")
    if details and "attention" in details:  # the fast-cudagraph engine: which kernels really run
        in_pool = details["attention"] == "kernel"
        fused = bool(details.get("fused_norms"))
        attention = "a Triton kernel reading each row's cache in the slot pool" if in_pool else "SDPA over the gathered cache"
        launch = details.get("attention_launch")
        if in_pool and launch:
            attention += (f", {launch['block_n'] or 'all'} keys a block, {launch['num_warps']} warps, "
                          f"{launch['num_stages']} stages, {launch['products']} products")
            if launch.get("order") == "heads":
                attention += ", a row's heads launched together"
        chains = "fused" if fused else "as PyTorch runs them"
        if details.get("masked_convs"):
            chains += "; the subsampling's convs reading their input masked in place"
        lines.append(f"step kernels: {'triton' if in_pool or fused else 'torch'} (attention: {attention}; "
                     f"element-wise chains {chains})")
    return frontends, lines
