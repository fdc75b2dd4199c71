"""TensorRT engine. TensorRT cannot be installed on these machines: its build and run tests
skip here with that reason, and everything else is tested on CPU: the graph TensorRT would
consume (through ONNX Runtime, in test_onnx_engine.py, and its shapes against the profile
here), the profile and plan-cache keys, and the runner's tensor-address binding and wrapper
dispatch, with a stand-in TensorRT execution context that reads and writes the bound
addresses and computes with ONNX Runtime.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
import torch

from engines.config import EngineConfig
from engines.encoders import EagerEncoder, TRTEncoderWrapper
from engines.export import INPUT_NAMES, OUTPUT_NAMES, encoder_io, example_inputs, export_encoder_onnx
from engines.tensorrt_engine import (BatchProfile, TensorRTEncoder, TensorRTRunner, atomic_write, batch_profile,
                                     plan_key, tensorrt_available, timing_cache_path)

TRT_OK, TRT_REASON = tensorrt_available()
needs_trt = pytest.mark.skipif(not TRT_OK, reason="tensorrt is not installed on this machine")
needs_trt_gpu = pytest.mark.skipif(not (TRT_OK and torch.cuda.is_available()),
                                   reason="tensorrt is not installed on this machine" if not TRT_OK else "needs CUDA")


@pytest.fixture(scope="module")
def model(tiny_engine):
    return tiny_engine.model


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    pytest.importorskip("onnx")
    return export_encoder_onnx(model, 160, str(tmp_path_factory.mktemp("trt-cache")))


# -- profile and cache keys ---------------------------------------------------------------------
def test_batch_profile_spans_one_to_max_batch():
    p = batch_profile(64)
    assert (p.min_batch, p.opt_batch, p.max_batch) == (1, 64, 64)
    assert batch_profile(64, opt_batch=16).opt_batch == 16
    assert batch_profile(8, opt_batch=100).opt_batch == 8
    with pytest.raises(ValueError):
        BatchProfile(2, 1, 4)
    with pytest.raises(ValueError):
        batch_profile(0)
    p.check(1)
    p.check(64)
    with pytest.raises(ValueError, match="outside the TensorRT profile"):
        p.check(65)


def test_profile_shapes_fit_the_exported_graph(model, exported):
    import onnx

    io = encoder_io(model)
    shapes = batch_profile(32, opt_batch=8).shapes(io)
    assert set(shapes) == set(INPUT_NAMES)
    graph = onnx.load(exported.path, load_external_data=False).graph
    for inp in graph.input:
        lo, opt, hi = shapes[inp.name]
        assert (lo[0], opt[0], hi[0]) == (1, 8, 32)
        assert lo[1:] == opt[1:] == hi[1:]  # only the batch axis varies
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param, f"{inp.name}: batch axis must be dynamic in the graph"
        assert tuple(d.dim_value for d in dims[1:]) == lo[1:], inp.name
    assert shapes["audio_signal"][0] == (1, io.n_mels, io.frames_in)
    assert shapes["cache_last_channel"][2] == (32, io.n_layers, io.cache_channel, io.d_model)


def test_plan_key_covers_everything_a_plan_depends_on():
    base = dict(checksum="abc", lookahead_ms=560, dtype=torch.float16, profile=batch_profile(64),
                trt_version="10.3.0", gpu="NVIDIA H100 80GB HBM3 sm90", onnx_key="k1")
    key = plan_key(**base)
    assert key == plan_key(**base)
    assert key.startswith("abc-la560-float16-b64-trt10.3.0")
    variants = [dict(checksum="abd"), dict(lookahead_ms=160), dict(dtype=torch.float32),
                dict(profile=batch_profile(128)), dict(profile=batch_profile(64, opt_batch=8)),
                dict(trt_version="10.4.0"), dict(gpu="NVIDIA L40S sm89"), dict(onnx_key="k2")]
    keys = {plan_key(**{**base, **v}) for v in variants}
    assert key not in keys and len(keys) == len(variants)


def test_timing_cache_path_and_atomic_write(tmp_path):
    path = timing_cache_path(str(tmp_path), "10.3.0", "NVIDIA H100 80GB HBM3 sm90")
    assert os.path.dirname(path) == os.path.join(str(tmp_path), "tensorrt")
    assert " " not in os.path.basename(path)
    atomic_write(path, b"plan bytes")
    atomic_write(path, b"newer plan bytes")
    with open(path, "rb") as f:
        assert f.read() == b"newer plan bytes"
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]


@pytest.mark.skipif(TRT_OK, reason="tensorrt is installed here")
def test_build_without_tensorrt_says_so(model):
    from engines.tensorrt_engine import build_tensorrt_encoder

    cfg = EngineConfig(engine="tensorrt", device="cpu", dtype="float32")
    with pytest.raises(RuntimeError, match="tensorrt is not installed on this machine"):
        build_tensorrt_encoder(model, cfg, torch.device("cpu"), torch.float32)


# -- the runner's binding logic, with a stand-in execution context -------------------------------
_CT = {torch.float32: ctypes.c_float, torch.int64: ctypes.c_int64, torch.int32: ctypes.c_int32}
_NP = {torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32}


def _at(ptr: int, shape, dtype) -> np.ndarray:
    """A numpy view of raw memory at a bound address."""
    n = int(np.prod(shape)) if len(shape) else 1
    buf = (_CT[dtype] * n).from_address(ptr)
    return np.ctypeslib.as_array(buf).view(_NP[dtype]).reshape(shape)


class FakeEngine:
    """ICudaEngine's tensor API over the exported graph's I/O; `int32_lengths` mimics plans
    that keep lengths as int32."""

    def __init__(self, session, int32_lengths=False):
        self.names = list(INPUT_NAMES) + list(OUTPUT_NAMES)
        self.num_io_tensors = len(self.names)
        self.types = {}
        for i in session.get_inputs() + session.get_outputs():
            t = torch.float32 if i.type == "tensor(float)" else torch.int64
            if t == torch.int64 and int32_lengths:
                t = torch.int32
            self.types[i.name] = t

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_dtype(self, name):
        return self.types[name]


class FakeContext:
    """IExecutionContext: shapes and addresses by name; execution reads the inputs from their
    addresses and writes the outputs to theirs (computed by ONNX Runtime)."""

    def __init__(self, engine, session, io):
        self.engine, self.session, self.io = engine, session, io
        self.shapes, self.addresses, self.streams = {}, {}, []

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        b = self.shapes["audio_signal"][0]
        io = self.io
        return {"outputs": (b, io.d_model, io.frames_out), "encoded_lengths": (b,),
                "cache_last_channel_next": (b, io.n_layers, io.cache_channel, io.d_model),
                "cache_last_time_next": (b, io.n_layers, io.d_model, io.cache_time),
                "cache_last_channel_next_len": (b,)}[name]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        self.streams.append(stream)
        feeds = {}
        for name in INPUT_NAMES:
            arr = _at(self.addresses[name], self.shapes[name], self.engine.types[name]).copy()
            feeds[name] = arr.astype(np.int64) if arr.dtype == np.int32 else arr
        results = self.session.run(list(OUTPUT_NAMES), feeds)
        for name, value in zip(OUTPUT_NAMES, results):
            dst = _at(self.addresses[name], self.get_tensor_shape(name), self.engine.types[name])
            dst[...] = value
        return True


def _fake_runner(exported, model, int32_lengths=False):
    import onnxruntime as ort

    session = ort.InferenceSession(exported.path, providers=["CPUExecutionProvider"])
    engine = FakeEngine(session, int32_lengths)
    context = FakeContext(engine, session, encoder_io(model))
    runner = TensorRTRunner(engine, context, batch_profile(8), dtype_of=lambda t: t, stream=lambda: 1234,
                            is_input=lambda name: name in INPUT_NAMES)
    return runner, context


@pytest.mark.parametrize("int32_lengths", [False, True])
def test_runner_binds_by_address_and_matches_eager(model, exported, int32_lengths):
    pytest.importorskip("onnxruntime")
    runner, context = _fake_runner(exported, model, int32_lengths)
    io = encoder_io(model)
    feats, length, cc, ct, ccl = example_inputs(io, 3, torch.float32, torch.device("cpu"), seed=7)
    out = runner(feats, length, cc, ct, ccl)
    assert runner.executions == 1 and context.streams == [1234]
    assert context.shapes["cache_last_channel"] == tuple(cc.shape)
    if not int32_lengths:  # already contiguous, right dtype: bound in place, no copy
        assert context.addresses["cache_last_channel"] == cc.data_ptr()
    # outputs are the very tensors bound for TensorRT to write (lengths converted from int32)
    same = [o.data_ptr() == context.addresses[n] for o, n in zip(out, OUTPUT_NAMES)]
    assert same == ([True, False, True, True, False] if int32_lengths else [True] * 5)
    assert out[1].dtype == torch.int64 and out[4].dtype == torch.int64
    enc = model.nemo_model.encoder
    with torch.inference_mode():
        ref = enc.cache_aware_stream_step(processed_signal=feats, processed_signal_length=length,
                                          cache_last_channel=cc.transpose(0, 1), cache_last_time=ct.transpose(0, 1),
                                          cache_last_channel_len=ccl, keep_all_outputs=True)
    assert (out[0] - ref[0]).abs().max() < 1e-4
    assert (out[2] - ref[2].transpose(0, 1)).abs().max() < 1e-4
    assert torch.equal(out[4], ref[4])
    with pytest.raises(ValueError, match="outside the TensorRT profile"):
        runner(*example_inputs(io, 9, torch.float32, torch.device("cpu")))
    assert runner.executions == 1


def test_tensorrt_encoder_dispatches_through_the_wrapper(model, exported, monkeypatch):
    """The seed's bug cannot recur: NeMo's streaming call goes to the plan, never to the
    original module's forward, and the engine counts what ran."""
    pytest.importorskip("onnxruntime")
    runner, _ = _fake_runner(exported, model)
    enc = model.nemo_model.encoder
    engine = TensorRTEncoder(enc, runner, plan_path="(stand-in)", cache_hit=False)
    assert isinstance(engine.wrapper, TRTEncoderWrapper) and engine.name == "tensorrt"

    def forbidden(*a, **k):
        raise AssertionError("the original PyTorch encoder ran")

    io = encoder_io(model)
    feats, length, cc, ct, ccl = example_inputs(io, 2, torch.float32, torch.device("cpu"), seed=3)
    cc, ct = cc.transpose(0, 1).contiguous(), ct.transpose(0, 1).contiguous()  # NeMo layout
    ref = [t.clone() for t in EagerEncoder(enc).step(feats, length, cc, ct, ccl)]
    monkeypatch.setattr(enc, "forward_internal", forbidden)
    monkeypatch.setattr(enc, "forward", forbidden)
    out = engine.step(feats, length, cc, ct, ccl)
    assert engine.executions == 1
    assert (out[0] - ref[0]).abs().max() < 1e-4
    assert (out[2] - ref[2]).abs().max() < 1e-4 and (out[3] - ref[3]).abs().max() < 1e-4
    assert torch.equal(out[1], ref[1]) and torch.equal(out[4], ref[4])


# -- real TensorRT (GPU machines with TensorRT only) ---------------------------------------------
@pytest.fixture(scope="module")
def trt_setup(tmp_path_factory):
    if not TRT_OK:
        pytest.skip("tensorrt is not installed on this machine")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from engines.models import load_model
    from engines.tensorrt_engine import build_tensorrt_encoder

    m = load_model("builtin:tiny", 160)
    m.nemo_model.to(device="cuda", dtype=torch.float16)
    m.nemo_model.preprocessor.to(dtype=torch.float32)
    cache = str(tmp_path_factory.mktemp("trt"))
    cfg = EngineConfig(model="builtin:tiny", engine="tensorrt", device="cuda", dtype="float16", lookahead_ms=160,
                       max_batch=8, cache_dir=cache)
    engine = build_tensorrt_encoder(m, cfg, torch.device("cuda"), torch.float16)
    return m, cfg, engine


@needs_trt_gpu
def test_tensorrt_plan_is_cached(trt_setup):
    from engines.tensorrt_engine import build_tensorrt_encoder

    m, cfg, engine = trt_setup
    again = build_tensorrt_encoder(m, cfg, torch.device("cuda"), torch.float16)
    assert again.plan_cache_hit and again.plan_path == engine.plan_path


@needs_trt_gpu
def test_tensorrt_matches_eager_and_counts(trt_setup):
    from engines.selfcheck import check_encoder_engine

    m, cfg, engine = trt_setup
    check = check_encoder_engine(engine, m, torch.device("cuda"), torch.float16, cfg.max_batch)
    assert check.passed, check.detail
    assert check.executions_after - check.executions_before == check.steps
