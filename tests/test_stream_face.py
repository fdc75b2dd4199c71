"""The one face the transport holds (server.scheduling.stream_books.StreamScheduler) and its three
implementations: Scheduler (the engine here or in its worker), RemoteScheduler (a frontend
process) and EngineCores (several engine cores). Each must have every member of the face, with
its parameters in order, their kinds and defaults, and the same async-ness; extra keyword
parameters with defaults are allowed. Without this the three agreed only by duck typing."""

from __future__ import annotations

import inspect

import pytest

from server.runtime.engine_cores import EngineCores
from server.runtime.remote_scheduler import RemoteScheduler
from server.scheduling.scheduler import Scheduler
from server.scheduling.stream_books import StreamScheduler

IMPLEMENTATIONS = [Scheduler, RemoteScheduler, EngineCores]
MEMBERS = [name for name, value in vars(StreamScheduler).items()
           if not name.startswith("_") and (callable(value) or isinstance(value, property))]
ATTRIBUTES = list(StreamScheduler.__annotations__)


def _params(fn):
    return [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def test_the_face_names_what_the_transport_uses():
    assert {"open_stream", "push_audio", "end_audio", "fail_stream", "end_utterance", "next_event", "close_stream",
            "check_admission", "begin_drain", "wait_idle", "active_streams", "capacity"} <= set(MEMBERS)
    assert set(ATTRIBUTES) == {"draining", "dead_reason"}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", MEMBERS)
def test_every_implementation_has_the_member_with_its_parameters(impl, name):
    face = vars(StreamScheduler)[name]
    got = inspect.getattr_static(impl, name, None)
    assert got is not None, f"{impl.__name__} lacks {name}"
    if isinstance(face, property):
        assert isinstance(got, property), f"{impl.__name__}.{name} must be a property"
        return
    assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(face), \
        f"{impl.__name__}.{name}: async-ness differs from the face"
    want, have = _params(face), {p.name: p for p in _params(got)}
    required = [p.name for p in want if p.default is inspect.Parameter.empty]
    assert [p.name for p in _params(got)][:len(required)] == required, \
        f"{impl.__name__}.{name}: its leading parameters are not the face's {required}"
    for p in want:  # the parameters with defaults are passed by keyword: their order may differ
        assert p.name in have, f"{impl.__name__}.{name} lacks the parameter {p.name}"
        assert have[p.name].kind == p.kind and have[p.name].default == p.default, \
            f"{impl.__name__}.{name}({have[p.name]}): the face has {p}"
    for extra in set(have) - {p.name for p in want}:
        assert have[extra].default is not inspect.Parameter.empty, \
            f"{impl.__name__}.{name}: extra parameter {extra} must have a default"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_every_implementation_sets_the_face_attributes(impl):
    source = inspect.getsource(impl) + "".join(inspect.getsource(base) for base in impl.__mro__[1:]
                                                if base.__module__.startswith("server."))
    for attr in ATTRIBUTES:
        assert f"self.{attr} =" in source or f"self.{attr}:" in source, f"{impl.__name__} never sets {attr}"
