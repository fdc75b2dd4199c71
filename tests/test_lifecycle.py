"""server/ops/lifecycle.py: the one lifecycle of every process role (server, engine core, frontend).

Unit tests of the transitions, of what is refused, of the metric and the gRPC health mapping.
Where each role really moves through it: tests/test_ops_http.py (a draining server, a dead one,
each frontend), tests/test_engine_cores.py (a killed core reads DEAD, a drained one DRAINING)."""

from __future__ import annotations

import itertools
import logging

import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import generate_latest

from server.service.app import grpc_health
from server.ops.lifecycle import ALLOWED, STRICT_ENV, IllegalTransition, Lifecycle, LifecycleState, strict_default
from server.ops.metrics import ServerMetrics

S = Lifecycle


def at(state: Lifecycle, strict: bool = True) -> LifecycleState:
    """A role driven to `state` along the usual path."""
    life = LifecycleState("role", strict=strict)
    path = {S.STARTING: [], S.SERVING: [S.SERVING], S.DRAINING: [S.SERVING, S.DRAINING],
            S.STOPPED: [S.SERVING, S.DRAINING, S.STOPPED], S.DEAD: [S.SERVING, S.DEAD]}[state]
    for step in path:
        assert life.to(step, reason="why" if step is S.DEAD else None)
    assert life.state is state
    return life


def test_the_suite_runs_strict():
    assert strict_default(), f"tests/conftest.py sets {STRICT_ENV}=1"


def test_the_allowed_transitions_are_the_lifecycle_order():
    assert ALLOWED == {
        S.STARTING: {S.SERVING, S.DRAINING, S.STOPPED, S.DEAD},
        S.SERVING: {S.DRAINING, S.STOPPED, S.DEAD},
        S.DRAINING: {S.STOPPED, S.DEAD},
        S.STOPPED: set(),
        S.DEAD: set(),
    }
    assert {s for s in S if s.final} == {S.STOPPED, S.DEAD}


@pytest.mark.parametrize("old, new", [(o, n) for o, n in itertools.product(S, S) if o is not n])
def test_every_transition_is_taken_or_refused_as_allowed(old, new):
    seen = []
    life = at(old)
    life.on_change = lambda a, b: seen.append((a, b))
    if new in ALLOWED[old]:
        assert life.to(new, reason="r") is True
        assert life.state is new and seen == [(old, new)]
    else:
        with pytest.raises(IllegalTransition, match=f"{old.name} -> {new.name}"):
            life.to(new)
        assert life.state is old and seen == []


def test_the_same_state_again_is_no_change():
    life = at(S.SERVING)
    since = life.since
    assert life.to(S.SERVING) is False and life.since == since


def test_serving_after_dead_is_refused_and_logged_in_production(caplog):
    life = at(S.DEAD, strict=False)
    with caplog.at_level(logging.ERROR, logger="nemostream.lifecycle"):
        assert life.serving() is False
    assert life.state is S.DEAD and life.reason == "why"
    assert [r.getMessage() for r in caplog.records] == ["illegal lifecycle transition refused"]
    assert (caplog.records[0].__dict__["from"], caplog.records[0].__dict__["to"]) == ("DEAD", "SERVING")


def test_serving_after_dead_raises_in_strict_mode():
    with pytest.raises(IllegalTransition):
        at(S.DEAD).serving()
    with pytest.raises(IllegalTransition):
        at(S.DRAINING).serving()  # a draining role never serves again


def test_drain_stop_and_die_keep_a_final_state():
    dead = at(S.DEAD)
    assert dead.drain() is False and dead.stop() is False and dead.die("later") is False
    assert dead.state is S.DEAD and dead.reason == "why", "a dead role stopped stays DEAD with its first reason"
    stopped = at(S.STOPPED)
    assert stopped.die("its worker exited after the stop") is False and stopped.drain() is False
    assert stopped.state is S.STOPPED and stopped.reason is None


def test_the_usual_paths():
    life = LifecycleState("server")
    assert life.state is S.STARTING and not life.is_serving
    assert life.serving() and life.is_serving
    assert life.drain() and life.name == "DRAINING"
    assert life.drain() is False  # the notice, then the drain itself
    assert life.stop() and life.state is S.STOPPED
    early = LifecycleState("core-0")
    assert early.die("warm-up failed") and early.state is S.DEAD and early.reason == "warm-up failed"


def test_grpc_health_is_serving_only_while_serving():
    assert grpc_health(S.SERVING) == health_pb2.HealthCheckResponse.SERVING
    for state in (S.STARTING, S.DRAINING, S.STOPPED, S.DEAD):
        assert grpc_health(state) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_the_metric_gives_each_roles_state():
    metrics = ServerMetrics()
    server, core = LifecycleState("server"), LifecycleState("core-1")
    metrics.watch_lifecycle(server)
    metrics.watch_lifecycle(core)
    server.serving()
    core.serving()
    core.die("the engine worker process exited (status -9)")
    text = generate_latest(metrics.registry).decode()
    assert 'asr_lifecycle_state{role="server",state="SERVING"} 1.0' in text
    assert 'asr_lifecycle_state{role="server",state="DEAD"} 0.0' in text
    assert 'asr_lifecycle_state{role="core-1",state="DEAD"} 1.0' in text
    assert 'asr_lifecycle_state{role="core-1",state="SERVING"} 0.0' in text
    # A role started again (a restarted frontend) is a new instance under the same name: it replaces the old one.
    metrics.watch_lifecycle(LifecycleState("core-1"))
    assert 'asr_lifecycle_state{role="core-1",state="STARTING"} 1.0' in generate_latest(metrics.registry).decode()
