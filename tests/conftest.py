"""Shared fixtures. Real models are built once per session: loading NeMo takes seconds."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# An illegal lifecycle transition (server.ops.lifecycle) raises here, in this process and in every
# server process the tests start, instead of being logged and refused as in production.
os.environ.setdefault("ASR_LIFECYCLE_STRICT", "1")
logging.getLogger("nemo_logger").setLevel(logging.ERROR)


# A test still running after this many seconds prints its threads' and tasks' stacks
# (tests/hang_report.py); pytest-timeout (pyproject.toml) fails it later.
HANG_REPORT_S = float(os.environ.get("NEMO_STREAM_TEST_HANG_REPORT_S", "240"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    from tests.hang_report import HangReporter

    with HangReporter(item.nodeid, HANG_REPORT_S, item.config.pluginmanager.getplugin("capturemanager")):
        return (yield)


@pytest.fixture(scope="session")
def event_loop_policy():
    """pytest-asyncio's loops for every test: ones that close the subprocess transports a test
    left open before they close (tests/loop_hygiene.py says why)."""
    from tests.loop_hygiene import ReapingLoopPolicy

    return ReapingLoopPolicy()


def _quiet_nemo() -> None:
    try:
        from nemo.utils import logging as nemo_logging
        nemo_logging.setLevel(logging.ERROR)
    except Exception:
        pass


@pytest.fixture(scope="session")
def tiny_engine():
    """builtin:tiny on CPU, fp32, 160 ms lookahead; tests must release every slot they take."""
    _quiet_nemo()
    from engines.config import EngineConfig
    from engines.factory import build_engine

    engine = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                       lookahead_ms=160, max_streams=16, max_batch=8))
    yield engine
    assert engine.slots_in_use() == 0, "a test leaked a cache slot"


# The server suites that run twice: on an in-process server ("local") and through the frontend
# <-> engine process wire ("wire": server.runtime.engine_host + server.runtime.remote_scheduler over a real Unix
# socket, what `asr-server --frontends N` runs). The wire variant runs on the fake engine only:
# what the wire can break is the relay, not the model. ASR_TEST_FRONTEND_IPC=1 runs every
# running_server test through the wire instead.
WIRE_MODULES = {"test_server_streaming", "test_server_errors", "test_server_ops", "test_server_cancellation", "test_server_utterances",
                "test_slow_clients", "test_faults", "test_riva_api", "test_server_audio"}


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__.rsplit(".", 1)[-1] in WIRE_MODULES and "server_path" in metafunc.fixturenames:
        metafunc.parametrize("server_path", ["local", "wire"], indirect=True)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        real = "tiny_engine" in item.fixturenames or params.get("engine_kind", "fake") != "fake"
        (drop if params.get("server_path") == "wire" and real else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    _reorder(items, os.environ.get("NEMO_STREAM_TEST_ORDER", ""))


def _reorder(items, order: str) -> None:
    """NEMO_STREAM_TEST_ORDER=reverse or shuffle-SEED runs the collected tests in another order
    (module-scoped fixtures are then set up more than once): a test that passes only after, or
    only before, some other test shows up. The order is printed with its seed."""
    if not order:
        return
    import random

    if order == "reverse":
        items.reverse()
    elif order.startswith("shuffle-"):
        random.Random(int(order.split("-", 1)[1])).shuffle(items)
    else:
        raise pytest.UsageError(f"NEMO_STREAM_TEST_ORDER={order!r}: use reverse or shuffle-SEED")
    print(f"\ntest order: {order} ({len(items)} tests)")


@pytest.fixture(autouse=True)
def server_path(request):
    from tests import server_harness

    mode = getattr(request, "param", "wire" if server_harness.FRONTEND_IPC else "local")
    server_harness.SERVER_PATH = mode
    yield mode
    server_harness.SERVER_PATH = "wire" if server_harness.FRONTEND_IPC else "local"
