"""Start-up self-check: no engine serves unless it runs and matches the eager reference.

builtin:tiny on CPU. Broken engines are injected through engines.factory.make_encoder_engine:
the seed's bug (a wrapper whose accelerated path never runs), an engine with wrong outputs,
and an engine that cannot be built.
"""

from __future__ import annotations

import pytest
import torch

import engines.factory as factory
from engines.config import EngineConfig
from engines.encoders import EagerEncoder, EncoderEngine
from engines.factory import EngineStartError, build_engine
from engines.selfcheck import check_encoder_engine


@pytest.fixture(scope="module", autouse=True)
def _flush_denormals():
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture
def tiny_model(tiny_engine, monkeypatch):
    """build_engine reuses the session's builtin:tiny instead of loading it again."""
    monkeypatch.setattr(factory, "load_model", lambda *a, **k: tiny_engine.model)
    return tiny_engine.model


class SeedBugWrapper(torch.nn.Module):
    """The seed's TRTEncoderWrapper: overrides forward only. NeMo's streaming code calls
    cache_aware_stream_step, which __getattr__ finds on the original encoder."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.engine_calls = 0

    def forward(self, *args, **kwargs):
        self.engine_calls += 1
        raise AssertionError("the accelerated engine would run here")

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["encoder"], name)


class SeedBugEngine(EncoderEngine):
    """Reports the accelerated engine's call counter, as the seed's health endpoint did."""

    name = "tensorrt"

    def __init__(self, encoder):
        super().__init__(encoder)
        self.wrapper = SeedBugWrapper(encoder)

    @property
    def executions(self):
        return self.wrapper.engine_calls

    def _run(self, feats, lengths, cc, ct, ccl):
        with torch.inference_mode():
            return self.wrapper.cache_aware_stream_step(
                processed_signal=feats, processed_signal_length=lengths, cache_last_channel=cc,
                cache_last_time=ct, cache_last_channel_len=ccl, keep_all_outputs=True)


class WrongEngine(EagerEncoder):
    """Runs (and counts) but computes something else."""

    name = "onnx"

    def _run(self, *args):
        enc, enc_len, cc, ct, ccl = super()._run(*args)
        return enc * 1.1, enc_len, cc, ct, ccl


def _inject(monkeypatch, name, make):
    real = factory.make_encoder_engine

    def fake(engine_name, model, cfg, device, dtype):
        if engine_name == name:
            return make(model.nemo_model.encoder)
        return real(engine_name, model, cfg, device, dtype)

    monkeypatch.setattr(factory, "make_encoder_engine", fake)


def _cfg(engine, fallback=None, **kw):
    return EngineConfig(model="builtin:tiny", engine=engine, fallback_engine=fallback, device="cpu",
                        dtype="float32", lookahead_ms=160, max_streams=4, max_batch=4, **kw)


def test_seed_bug_engine_fails_self_check_directly(tiny_model):
    engine = SeedBugEngine(tiny_model.nemo_model.encoder)
    check = check_encoder_engine(engine, tiny_model, torch.device("cpu"), torch.float32, max_batch=4)
    assert not check.passed
    assert "did not run" in check.detail
    assert check.executions_after == check.executions_before == 0


def test_seed_bug_engine_refuses_to_start(tiny_model, monkeypatch):
    _inject(monkeypatch, "tensorrt", SeedBugEngine)
    with pytest.raises(EngineStartError, match="did not run.*Refusing to start"):
        build_engine(_cfg("tensorrt"))


def test_wrong_outputs_refuse_to_start(tiny_model, monkeypatch):
    _inject(monkeypatch, "onnx", WrongEngine)
    with pytest.raises(EngineStartError, match="differ from the eager reference"):
        build_engine(_cfg("onnx"))


def test_build_failure_refuses_to_start(tiny_model, monkeypatch):
    def cannot_build(encoder):
        raise RuntimeError("tensorrt is not installed on this machine")

    _inject(monkeypatch, "tensorrt", cannot_build)
    with pytest.raises(EngineStartError, match="cannot be built.*not installed.*Refusing"):
        build_engine(_cfg("tensorrt"))


def test_fallback_starts_and_reports_what_runs(tiny_model, monkeypatch):
    _inject(monkeypatch, "tensorrt", SeedBugEngine)
    engine = build_engine(_cfg("tensorrt", fallback="eager"))
    report = engine.startup_report
    assert report.configured_engine == "tensorrt"
    assert report.engine == "eager" and report.fell_back
    assert "did not run" in report.fallback_reason
    # health and metrics: what executed, never what was configured
    assert set(engine.executions()) == {"eager"}
    assert engine.warmup() == "eager"
    assert engine.executions() == {"eager": 1}
    assert engine.slots_in_use() == 0


def test_fallback_that_fails_too_refuses(tiny_model, monkeypatch):
    _inject(monkeypatch, "tensorrt", SeedBugEngine)
    _inject(monkeypatch, "onnx", WrongEngine)
    with pytest.raises(EngineStartError, match="fallback engine failed too"):
        build_engine(_cfg("tensorrt", fallback="onnx"))


def test_real_onnx_engine_passes_and_reports_itself(tiny_model, tmp_path):
    pytest.importorskip("onnxruntime")
    engine = build_engine(_cfg("onnx", cache_dir=str(tmp_path)))
    report = engine.startup_report
    assert report.engine == report.configured_engine == "onnx" and not report.fell_back
    check = report.self_check
    assert check.passed and check.max_rel_error < 1e-4, check.detail
    assert check.executions_after - check.executions_before == check.steps
    assert engine.executions() == {"onnx": check.steps}
    assert engine.warmup() == "onnx"
    assert engine.executions() == {"onnx": check.steps + 1}


def test_cudagraph_padding_path_passes_self_check(tiny_model):
    """The cudagraph engine's buckets and padding, run without capture (no CUDA here)."""
    from engines.cudagraph_engine import build_cudagraph_encoder

    cfg = _cfg("cudagraph")
    engine = build_cudagraph_encoder(tiny_model, cfg, torch.device("cpu"), torch.float32, use_graphs=False)
    check = check_encoder_engine(engine, tiny_model, torch.device("cpu"), torch.float32, cfg.max_batch)
    assert check.passed, check.detail
    assert check.rows == 3 and 4 in engine.buckets  # 3 real rows ran in the 4-row bucket


def test_eager_is_the_reference_and_is_not_self_checked(tiny_model):
    engine = build_engine(_cfg("eager"))
    assert engine.startup_report.self_check is None
    assert engine.executions() == {"eager": 0}


class KernelEngine(WrongEngine):
    """Stands for the fast-cudagraph engine built with the Triton step kernels (its `attention`
    says so) whose outputs are wrong; built with PyTorch's kernels (`attention` "sdpa") it is the
    eager reference, right."""

    name = "fast-cudagraph"

    def __init__(self, encoder, kernels: str):
        super().__init__(encoder)
        self.attention = "kernel" if kernels != "torch" else "sdpa"

    def _run(self, *args):
        if self.attention == "kernel":
            return super()._run(*args)
        return EagerEncoder._run(self, *args)


def _inject_kernels(monkeypatch, built):
    def fake(engine_name, model, cfg, device, dtype):
        built.append(cfg.step_kernels)
        return KernelEngine(model.nemo_model.encoder, cfg.step_kernels)

    monkeypatch.setattr(factory, "make_encoder_engine", fake)


@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_an_engine_whose_triton_kernels_fail_the_self_check_starts_with_pytorchs(tiny_model, monkeypatch, caplog,
                                                                                  kernels):
    """The step kernels are a speed-up of the same engine: where the engine built with them fails
    its self-check, it is built again with PyTorch's kernels, checked again, and serves, with a
    warning that says why (`--step-kernels auto` is the default on a GPU)."""
    built = []
    _inject_kernels(monkeypatch, built)
    with caplog.at_level("WARNING", logger="engines.factory"):
        engine = build_engine(_cfg("fast-cudagraph", step_kernels=kernels))
    assert built == [kernels, "torch"]
    assert engine.encoder_engine.attention == "sdpa"
    report = engine.startup_report
    assert report.engine == "fast-cudagraph" and not report.fell_back and report.self_check.passed
    assert any("Triton step kernels" in r.getMessage() and "differ from the eager reference" in r.getMessage()
               for r in caplog.records)
    assert engine.slots_in_use() == 0


def test_an_engine_that_fails_the_self_check_with_pytorchs_kernels_refuses_to_start(tiny_model, monkeypatch):
    built = []
    _inject_kernels(monkeypatch, built)
    monkeypatch.setattr(KernelEngine, "_run", WrongEngine._run)  # wrong with either kernels
    with pytest.raises(EngineStartError, match="differ from the eager reference.*Refusing to start"):
        build_engine(_cfg("fast-cudagraph", step_kernels="auto"))
    assert built == ["auto", "torch"]
    built.clear()
    with pytest.raises(EngineStartError, match="differ from the eager reference"):
        build_engine(_cfg("fast-cudagraph", step_kernels="torch"))
    assert built == ["torch"]  # asked for PyTorch's kernels: nothing to fall back from
