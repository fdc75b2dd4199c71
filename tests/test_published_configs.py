"""The published model configurations (bench/published_configs.py) at one layer, on CPU: each
builds with NeMo, saves as a .nemo, loads through engines.models.load_model, and streams through
the eager and fast engines with the same tokens as NeMo's own streaming step, on speech-like audio
and with non-empty transcripts. The full-size models run on the GPU host
(tests/gpu/test_gpu_checkpoints.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.published_configs import EOU_PIECES, PUBLISHED, save
from engines.models import load_model, speechlike_audio
from tests.engine_helpers import length_nemo_fully_consumes, nemo_reference_tokens, run_alone


@pytest.fixture(scope="module", autouse=True)
def _flush_denormals():
    before = torch.is_flush_denormal() if hasattr(torch, "is_flush_denormal") else False
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(before)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("published")
    for name in PUBLISHED:
        out[name] = save(name, root / f"{name}.nemo", layers=1)
    return out


def _engine(loaded, name: str, lookahead_ms: int):
    from engines.encoders import EagerEncoder
    from engines.fast_engines import FastConformerEncoder
    from engines.streaming_engine import StreamingEngine

    enc = loaded.nemo_model.encoder
    encoder = EagerEncoder(enc) if name == "eager" else FastConformerEncoder(enc)
    return StreamingEngine(loaded, encoder, lookahead_ms, capacity=2, max_batch=2, device=torch.device("cpu"),
                           dtype=torch.float32)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_saves_loads_and_streams_like_nemo(saved, name):
    spec = PUBLISHED[name]
    loaded = load_model(str(saved[name]), spec.lookahead_ms)
    m = loaded.nemo_model.eval()
    assert type(m).__name__ == spec.model_class
    assert m.encoder.d_model == spec.d_model and len(m.encoder.layers) == 1
    assert m.decoder.pred_rnn_layers == spec.pred_layers
    assert bool(m.encoder.layers[0].feed_forward1.linear1.bias is not None) == spec.use_bias
    if spec.eou:
        assert loaded.lookaheads_ms == (160,)
        assert [loaded.pieces[i] for i in (1024, 1025)] == list(EOU_PIECES) and loaded.blank_id == 1026
    else:
        assert loaded.lookaheads_ms == (80, 160, 560, 1120) and loaded.blank_id == 1024
    eager = _engine(loaded, "eager", spec.lookahead_ms)
    g = eager.geometry
    n = length_nemo_fully_consumes(g, 1.7)
    audio = speechlike_audio(n / 16000, seed=11)[:n]
    ref = nemo_reference_tokens(m, np.concatenate([np.zeros(g.lead_in, np.float32), audio]))
    assert len(ref) > 0, "NeMo's own step emitted nothing: the comparison would be vacuous"
    assert run_alone(eager, audio).tokens == ref
    fast = _engine(loaded, "fast", spec.lookahead_ms)
    got = run_alone(fast, audio)
    assert got.tokens == ref and got.text.strip()
