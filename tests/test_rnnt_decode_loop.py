"""The RNNT decode loop's termination tests (engines/rnnt_decoder.py): a decode of T frames
takes at least T iterations, so the blocks those need are queued before the first test, each
test being a device-to-host wait. Same tokens either way, one wait fewer a step where the chunk
has more frames than a block has iterations (560 ms: 7 frames, blocks of 4)."""

from __future__ import annotations

import pytest

from engines.config import EngineConfig
from engines.factory import build_engine
from engines.models import speechlike_audio
from tests.engine_helpers import run_streams


@pytest.mark.parametrize("lookahead_ms", [160, 560])
def test_queued_blocks_decode_the_same_tokens_with_fewer_waits(lookahead_ms):
    engine = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                       lookahead_ms=lookahead_ms, max_streams=8, max_batch=8))
    decoder = engine.decoder
    T = engine.geometry.encoder_frames
    audios = {f"s{i}": speechlike_audio(2.0 + 0.3 * i, seed=700 + i) for i in range(5)}
    counts = {}
    tokens = {}
    for queued in (False, True):
        decoder.queue_min_blocks = queued
        blocks, tests, steps = decoder.blocks_run, decoder.termination_tests, engine._steps_run
        runs = run_streams(engine, audios, seed=3)
        tokens[queued] = {sid: r.tokens for sid, r in runs.items()}
        counts[queued] = (decoder.blocks_run - blocks, decoder.termination_tests - tests, engine._steps_run - steps)
    assert tokens[True] == tokens[False]
    assert any(tokens[True].values()), "nothing decoded: the comparison is vacuous"
    blocks, tests, steps = counts[False]
    assert tests == blocks  # a test after every block
    blocks, tests, steps = counts[True]
    first_test = -(-T // decoder.sync_every)
    # every step skips the tests before its first_test-th block, and no block more is run
    assert blocks - tests == steps * (first_test - 1)
    assert blocks >= counts[False][0]  # more only where a step's rows all end short of T frames
    if lookahead_ms == 560:
        assert T == 7 and first_test == 2 and tests < blocks
    assert engine.slots_in_use() == 0
