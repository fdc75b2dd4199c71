"""One lifecycle for every process role: the server as a whole, each engine core, each frontend.

    STARTING -> SERVING -> DRAINING -> STOPPED
         \\          \\          \\
          +----------+----------+--> DEAD (with its reason)

STARTING may also go straight to DRAINING or STOPPED (a signal or a failure during start-up),
and SERVING straight to STOPPED (a stop without a drain). STOPPED and DEAD are final: a role
that stopped or died never serves again (a restarted frontend is a new role instance).

Where it shows (the same enum name everywhere): /health's JSON (`status` is the server's
state, `cores[i].state`, `frontends[i].state`), /ready (200 only while SERVING), gRPC health
(SERVING while SERVING, NOT_SERVING otherwise) and the metric asr_lifecycle_state{role,state}.

Two kinds of request:
  - `to(state)` is the strict primitive: a transition outside ALLOWED is illegal. It is
    refused (the state does not change) and logged as an error; with ASR_LIFECYCLE_STRICT=1
    in the environment (the test suite sets it, for its server subprocesses too) it raises
    IllegalTransition, so a wrong order in the code fails a test instead of a log line.
  - `drain()`, `stop()` and `die(reason)` say what happened and keep a final state: a dead
    role that is then stopped stays DEAD (its reason is what /health must show), a stopped
    core whose worker then exits stays STOPPED. `serving()` is `to(SERVING)`: never absorbed.

Pure Python: no gRPC, no metrics library (those read `state` from above).
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger("nemostream.lifecycle")

STRICT_ENV = "ASR_LIFECYCLE_STRICT"


class Lifecycle(enum.Enum):
    STARTING = "STARTING"
    SERVING = "SERVING"
    DRAINING = "DRAINING"
    STOPPED = "STOPPED"
    DEAD = "DEAD"

    @property
    def final(self) -> bool:
        return self in (Lifecycle.STOPPED, Lifecycle.DEAD)


ALLOWED: dict[Lifecycle, frozenset[Lifecycle]] = {
    Lifecycle.STARTING: frozenset({Lifecycle.SERVING, Lifecycle.DRAINING, Lifecycle.STOPPED, Lifecycle.DEAD}),
    Lifecycle.SERVING: frozenset({Lifecycle.DRAINING, Lifecycle.STOPPED, Lifecycle.DEAD}),
    Lifecycle.DRAINING: frozenset({Lifecycle.STOPPED, Lifecycle.DEAD}),
    Lifecycle.STOPPED: frozenset(),
    Lifecycle.DEAD: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A transition outside ALLOWED (raised only in strict mode; otherwise logged and refused)."""


def strict_default() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


class LifecycleState:
    """One role's state, its reason (why it died), and when it entered that state.

    `on_change(old, new)` runs after every change (in the caller's thread: the owner's event
    loop for every role here)."""

    def __init__(self, role: str, on_change: Callable[[Lifecycle, Lifecycle], None] | None = None,
                 strict: bool | None = None):
        self.role = role
        self.state = Lifecycle.STARTING
        self.reason: str | None = None
        self.since = time.monotonic()
        self.on_change = on_change
        self.strict = strict_default() if strict is None else strict

    def __repr__(self) -> str:
        return f"LifecycleState({self.role!r}, {self.state.name}{', ' + repr(self.reason) if self.reason else ''})"

    @property
    def name(self) -> str:
        return self.state.name

    def to(self, new: Lifecycle, reason: str | None = None) -> bool:
        """Move to `new`; True when the state changed. The same state again is no change (and
        keeps the first reason). An illegal transition is refused: see the module doc."""
        old = self.state
        if new is old:
            return False
        if new not in ALLOWED[old]:
            message = f"{self.role}: illegal lifecycle transition {old.name} -> {new.name}"
            if self.strict:
                raise IllegalTransition(message)
            log.error("illegal lifecycle transition refused",
                      extra={"role": self.role, "from": old.name, "to": new.name})
            return False
        self.state, self.since = new, time.monotonic()
        if reason is not None:
            self.reason = reason
        log.info("lifecycle", extra={"role": self.role, "from": old.name, "to": new.name,
                                     **({"reason": reason} if reason else {})})
        if self.on_change is not None:
            self.on_change(old, new)
        return True

    def serving(self) -> bool:
        return self.to(Lifecycle.SERVING)

    def drain(self) -> bool:
        """Draining begins (or its notice): a final state stays as it is."""
        return False if self.state.final else self.to(Lifecycle.DRAINING)

    def stop(self) -> bool:
        """Stopped: a dead role stays DEAD (and keeps its reason)."""
        return False if self.state.final else self.to(Lifecycle.STOPPED)

    def die(self, reason: str) -> bool:
        """Dead, with why; a role already stopped stays STOPPED (its engine exiting after a
        stop is no death), one already dead keeps its first reason."""
        return False if self.state.final else self.to(Lifecycle.DEAD, reason)

    @property
    def is_serving(self) -> bool:
        return self.state is Lifecycle.SERVING
