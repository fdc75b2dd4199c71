"""Loading users' .nemo files: BPE and character vocabularies, RNNT and hybrid RNNT/CTC."""

from __future__ import annotations


import pytest
import torch
from omegaconf import OmegaConf, open_dict

from engines.models import BUILTINS, _builtin_cfg, load_model, speechlike_audio
from tests.engine_helpers import run_alone


def _tiny_cfg():
    return _builtin_cfg(BUILTINS["tiny"])


def _char_cfg():
    cfg = _tiny_cfg()
    labels = list(" abcdefghijklmnopqrstuvwxyz'") + [chr(c) for c in range(0x0905, 0x0939)]
    with open_dict(cfg):
        del cfg["tokenizer"]
        cfg.labels = labels
        cfg.decoder.vocab_size = len(labels)
        cfg.joint.num_classes = len(labels)
        cfg.joint.vocabulary = labels
    return cfg


def _hybrid_cfg():
    cfg = _tiny_cfg()
    with open_dict(cfg):
        cfg.aux_ctc = OmegaConf.create(dict(
            ctc_loss_weight=0.3,
            decoder=dict(_target_="nemo.collections.asr.modules.ConvASRDecoder", feat_in=64,
                         num_classes=-1, vocabulary=[]),
            decoding=dict(strategy="greedy")))
    return cfg


@pytest.mark.parametrize("kind", ["bpe", "char", "hybrid"])
def test_nemo_file_loads_and_streams(tmp_path, kind):
    from nemo.collections.asr.models import (EncDecHybridRNNTCTCBPEModel, EncDecRNNTBPEModel,
                                             EncDecRNNTModel)

    torch.manual_seed(0)
    cls, cfg = {"bpe": (EncDecRNNTBPEModel, _tiny_cfg), "char": (EncDecRNNTModel, _char_cfg),
                "hybrid": (EncDecHybridRNNTCTCBPEModel, _hybrid_cfg)}[kind]
    model = cls(cfg=cfg())
    path = tmp_path / f"{kind}.nemo"
    model.save_to(str(path))

    loaded = load_model(str(path), lookahead_ms=560)
    assert not loaded.random_weights
    assert loaded.lookaheads_ms == (80, 160, 560, 1120)
    assert loaded.nemo_model.encoder.att_context_size == [70, 6]
    assert loaded.word_boundary == ("" if kind == "char" else "▁")
    assert loaded.blank_id == len(loaded.pieces)

    from engines.encoders import EagerEncoder
    from engines.streaming_engine import StreamingEngine

    m = loaded.nemo_model.eval()
    engine = StreamingEngine(loaded, EagerEncoder(m.encoder), 560, capacity=2, max_batch=2,
                             device=torch.device("cpu"), dtype=torch.float32)
    run = run_alone(engine, speechlike_audio(1.5, seed=3))
    assert run.final and run.chunks == engine.geometry.total_chunks(24000)
    assert engine.executions() == {"eager": run.chunks}


def test_missing_file_and_bad_lookahead(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope.nemo"), 160)
    with pytest.raises(ValueError, match="lookahead_ms 200 not supported"):
        from engines.config import EngineConfig
        EngineConfig(lookahead_ms=200)


def test_non_streaming_model_is_refused(tmp_path):
    from nemo.collections.asr.models import EncDecRNNTBPEModel

    cfg = _tiny_cfg()
    with open_dict(cfg):
        cfg.encoder.att_context_style = "regular"
        cfg.encoder.att_context_size = [-1, -1]
    model = EncDecRNNTBPEModel(cfg=cfg)
    path = tmp_path / "offline.nemo"
    model.save_to(str(path))
    with pytest.raises(ValueError, match="not a cache-aware"):
        load_model(str(path), 160)


@pytest.mark.slow
def test_builtin_nemotron_shape():
    """The benchmark model has the Nemotron speech streaming 0.6B shape (and runs a step)."""
    from engines.config import EngineConfig
    from engines.factory import build_engine

    engine = build_engine(EngineConfig(model="builtin:nemotron-0.6b", device="cpu", dtype="float32",
                                       lookahead_ms=560, max_streams=1, max_batch=1))
    m = engine.model.nemo_model
    params = sum(p.numel() for p in m.parameters())
    assert 0.55e9 < params < 0.65e9
    enc = m.encoder
    assert (len(enc.layers), enc.d_model, enc.subsampling_factor) == (24, 1024, 8)
    assert enc.layers[0].self_attn.h == 8
    assert enc.att_context_size_all == [[70, 13], [70, 6], [70, 1], [70, 0]]
    assert m.decoder.pred_hidden == 640 and len(engine.model.pieces) == 1024
    g = engine.geometry
    assert (g.chunk_frames, g.pre_encode_frames, g.encoder_frames) == (56, 9, 7)
    assert engine.warmup() == "eager"
    # fp16 figure from DESIGN.md: 3.8 MB per stream for the two big caches
    cache_bytes = 2 * (24 * 70 * 1024 + 24 * 1024 * 8)
    assert abs(cache_bytes / 1e6 - 3.8) < 0.1


# -- .nemo files as older NeMo versions wrote them ---------------------------------------------
def _repack(src, dst, *, gzip: bool = False, dot_prefix: bool = True, legacy_weights: bool = False) -> None:
    """Rewrites a .nemo (a tar of model_config.yaml, model_weights.ckpt and the tokenizer's
    artifacts) the way older NeMo versions did: gzip-compressed (NeMo 1.0-1.6 wrote `w:gz`),
    members without the `./` prefix, weights in torch's pre-1.6 (non-zip) serialization."""
    import tarfile
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(src, "r:") as tar:
            tar.extractall(tmp, filter="data")
        weights = Path(tmp) / "model_weights.ckpt"
        assert weights.exists()
        if legacy_weights:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            torch.save(state, weights, _use_new_zipfile_serialization=False)
        with tarfile.open(dst, "w:gz" if gzip else "w:") as tar:
            for f in sorted(Path(tmp).rglob("*")):
                name = f.relative_to(tmp).as_posix()
                tar.add(f, arcname=f"./{name}" if dot_prefix else name, recursive=False)


# Each of the three differences loaded alone as well when this was written (each costs a NeMo
# restore, ~10 s on CI): the suite keeps the file that has all three at once.
OLD_FORMATS = {
    "gzip-tar+legacy-weights+no-prefix": dict(gzip=True, legacy_weights=True, dot_prefix=False),
}


@pytest.fixture(scope="module")
def current_nemo(tmp_path_factory):
    from nemo.collections.asr.models import EncDecRNNTBPEModel

    torch.manual_seed(0)
    model = EncDecRNNTBPEModel(cfg=_tiny_cfg())
    from engines.models import _calibrate_joint
    _calibrate_joint(model.eval(), 0)
    path = tmp_path_factory.mktemp("current") / "current.nemo"
    model.save_to(str(path))
    loaded = load_model(str(path), lookahead_ms=160)
    return path, _tokens(loaded)


def _tokens(loaded) -> list[int]:
    from engines.encoders import EagerEncoder
    from engines.streaming_engine import StreamingEngine

    engine = StreamingEngine(loaded, EagerEncoder(loaded.nemo_model.eval().encoder), 160, capacity=1, max_batch=1,
                             device=torch.device("cpu"), dtype=torch.float32)
    return run_alone(engine, speechlike_audio(1.3, seed=5)).tokens


@pytest.mark.parametrize("fmt", list(OLD_FORMATS))
def test_older_nemo_file_formats_load_and_stream_the_same(tmp_path, current_nemo, fmt):
    path, tokens = current_nemo
    assert len(tokens) > 0, "an empty transcript would make the comparison vacuous"
    old = tmp_path / f"{fmt}.nemo"
    _repack(path, old, **OLD_FORMATS[fmt])
    assert _tokens(load_model(str(old), lookahead_ms=160)) == tokens
