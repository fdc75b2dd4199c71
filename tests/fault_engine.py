"""A fault-injecting wrapper around any StreamingEngine: the fake one, or the real
builtin:tiny StreamingEngine.

Faults (each may be set, and changed, while a server runs):
  - poison: chunks for which `poison(chunk)` is true make every step that contains them fail
    (a stream whose audio crashes the engine); a stream once seen poisoned stays poisoned;
  - oom_above: steps of more chunks than this run out of device memory;
  - fail_next: the next n steps fail (a transient fault);
  - fail_all: every step fails (a dead device).

Around the real engine the fault is raised *inside* StreamingEngine.step, after features,
gather and the encoder ran and before anything is committed (out of memory as
torch.cuda.OutOfMemoryError, which the engine must translate into EngineOverloadedError):
that proves the engine's promise that a step that raises changes no state. Around the fake
engine it is raised before the step, which is what the fake's contract promises too (and the
fake stands in for the engine layer's OOM translation by raising EngineOverloadedError).

`build_dead_engine` is an `asr-server --engine-factory`: the fake engine that warms up and
then fails every step.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from engines.api import ChunkWork, EngineError, EngineOverloadedError, StepPlan, StepResult
from engines.config import EngineConfig
from tests.fake_engine import FakeEngine

POISON_MESSAGE = "injected fault: the engine crashed on this audio"


class FaultyEngine:
    def __init__(self, inner, *, poison: Callable[[ChunkWork], bool] | None = None,
                 oom_above: int | None = None, fail_next: int = 0, fail_all: bool = False):
        self.inner = inner
        self.poison = poison
        self.oom_above = oom_above
        self.fail_next = fail_next
        self.fail_all = fail_all
        self.poisoned: set[str] = set()
        self.attempts: list[tuple[int, str]] = []   # (batch size, "ok" or the fault raised)
        self.gate = threading.Event()               # steps wait on it; set = run freely
        self.gate.set()
        self.steps_entered = 0
        self._lock = threading.Lock()
        self._pending = threading.local()
        self._real = hasattr(inner, "encoder_engine")
        self._unhook = self._hook_encoder(inner.encoder_engine) if self._real else None

    def restore(self) -> None:
        """Unhook the real engine's encoder (a shared engine outlives this wrapper)."""
        if self._unhook is not None:
            self._unhook()
            self._unhook = None

    # Everything but the step is the inner engine's.
    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def max_batch(self) -> int:
        return self.inner.max_batch

    def _fault_for(self, plan: StepPlan) -> str | None:
        with self._lock:
            for c in plan.chunks:
                if self.poison is not None and self.poison(c):
                    self.poisoned.add(c.stream_id)
            if self.fail_all:
                return "dead"
            if self.fail_next > 0:
                self.fail_next -= 1
                return "transient"
            if any(c.stream_id in self.poisoned for c in plan.chunks):
                return "poison"
            if self.oom_above is not None and len(plan.chunks) > self.oom_above:
                return "oom"
        return None

    def step(self, plan: StepPlan) -> StepResult:
        with self._lock:
            self.steps_entered += 1
        self.gate.wait()
        fault = self._fault_for(plan)
        self.attempts.append((len(plan.chunks), fault or "ok"))
        if self._real:
            self._pending.fault = (fault, len(plan.chunks))
            try:
                return self.inner.step(plan)
            finally:
                self._pending.fault = None
        if fault is not None:
            raise _exception(fault, len(plan.chunks), real=False)
        return self.inner.step(plan)

    def _hook_encoder(self, encoder_engine) -> None:
        original = encoder_engine.step

        def step(*args, **kwargs):
            out = original(*args, **kwargs)  # the encoder really ran; nothing is committed yet
            fault, batch = getattr(self._pending, "fault", None) or (None, 0)
            if fault is not None:
                raise _exception(fault, batch, real=True)
            return out

        encoder_engine.step = step

        def unhook() -> None:
            del encoder_engine.step  # back to the class's method

        return unhook

    def faults(self) -> list[str]:
        return [f for _, f in self.attempts if f != "ok"]


def _exception(fault: str, batch: int, real: bool) -> Exception:
    if fault == "oom":
        message = f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at batch size {batch})"
        if real:
            import torch  # only around the real engine, whose tests load torch anyway

            return torch.cuda.OutOfMemoryError(message)
        return EngineOverloadedError(message, batch_size=batch)
    if fault == "poison":
        return EngineError(POISON_MESSAGE)
    if fault == "dead":
        return EngineError("injected fault: the device is gone")
    return EngineError("injected fault: a transient step failure")


def build_dead_engine(cfg: EngineConfig) -> FaultyEngine:
    """--engine-factory: warms up (the warm-up bypasses the wrapper), then every step fails."""
    inner = FakeEngine(capacity=cfg.max_streams, max_batch=cfg.max_batch, lookahead_ms=cfg.lookahead_ms,
                       step_delay_s=float(os.environ.get("FAKE_ENGINE_STEP_DELAY_S", "0")))
    return FaultyEngine(inner, fail_all=True)
