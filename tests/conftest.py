"""Shared fixtures. Real models are built once per session: loading NeMo takes seconds."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("nemo_logger").setLevel(logging.ERROR)


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
