"""The configurations users serve (bench/published_configs.py, full size, random weights), saved as
.nemo files with NeMo on this host's torch, loaded back and run on every engine that runs here
(eager, fast, fast-cudagraph and cudagraph on CUDA in float32; onnx on the CPU, the host's ONNX
Runtime having no CUDA provider), each in token parity with NeMo's own streaming step
(`conformer_stream_step`, float32 on CUDA, TF32 off) on speech; then `asr-server --model
file.nemo` serves each through gRPC with its defaults (fast-cudagraph, float16)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import torch

from bench.published_configs import EOU_PIECES, PUBLISHED
from engines.models import load_model
from proto import asr_stream_pb2 as pb
from proto import asr_stream_pb2_grpc as pb_grpc
from tests.engine_helpers import length_nemo_fully_consumes, nemo_reference_tokens, run_streams
from tests.gpu.agreement import agreement, build_on
from tests.gpu.conftest import record
from tests.gpu.speech import clips
from tests.server_harness import ROOT, final_transcript, python_path, requests_for, spawn_server

STREAMS = int(os.environ.get("GPU_CHECKPOINT_STREAMS", "8"))
# One model per process (scripts/gpu_suite.sh runs this file once per model): see `checkpoint`.
MODELS = [m for m in os.environ.get("GPU_CHECKPOINT_MODEL", ",".join(PUBLISHED)).split(",") if m]
ENGINES = ("eager", "fast", "fast-cudagraph", "cudagraph", "onnx")


@pytest.fixture(scope="module")
def fp32_exact():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _save_in_own_process(name: str, path) -> float:
    """bench.published_configs.save in a fresh interpreter, as a user saves a model: nothing a
    test did in this process (an ONNX export, a graph capture) can touch the file."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"from bench.published_configs import save; save({name!r}, {str(path)!r})"],
                   check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=python_path()))
    return time.perf_counter() - t0


def _why_not_loadable(path) -> dict:
    """What a .nemo's weights hold that torch.load(weights_only=True) refused: the types of the
    state dict's values, read with weights_only=False (our own file: trusted)."""
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(path) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("model_weights.ckpt"))
            tar.extract(member, tmp, filter="data")
        state = torch.load(os.path.join(tmp, member.name), map_location="cpu", weights_only=False)
    odd = {k: type(v).__name__ for k, v in state.items() if type(v) is not torch.Tensor}
    return {"entries": len(state), "not_plain_tensors": dict(list(odd.items())[:20]), "torch": torch.__version__}


@pytest.fixture(scope="module", params=MODELS)
def checkpoint(request, tmp_path_factory, fp32_exact):
    """(name, path, the loaded model, speech clips, NeMo's reference tokens per clip). The .nemo is
    restored once in this process: on the GPU host (torch 2.11, NeMo 3.0) a second restore_from in
    one process failed with torch.load's weights-only UnpicklingError after the first succeeded
    (tests/gpu/RESULTS.md); asr-server restores a model once per process."""
    name = request.param
    spec = PUBLISHED[name]
    path = tmp_path_factory.mktemp(name) / f"{name}.nemo"
    saved_s = _save_in_own_process(name, path)
    t0 = time.perf_counter()
    try:
        loaded = load_model(str(path), spec.lookahead_ms)
    except Exception as exc:
        record(f"checkpoint_{name}_load_failure", {"error": f"{type(exc).__name__}: {str(exc)[:600]}",
                                                   **_why_not_loadable(path)})
        raise
    loaded_s = time.perf_counter() - t0
    params = sum(p.numel() for p in loaded.nemo_model.parameters())
    nemo = loaded.nemo_model.to("cuda").eval()
    from engines.streaming_engine import geometry_of
    g = geometry_of(loaded, spec.lookahead_ms)
    audios, reference = {}, {}
    for i, (clip_name, samples, _) in enumerate(clips(200)[:STREAMS]):
        n = length_nemo_fully_consumes(g, min(len(samples), 16000 * 4) / 16000)
        audio = np.pad(samples, (0, max(0, n - len(samples))))[:n]
        audios[f"{i}"] = audio
        reference[f"{i}"] = nemo_reference_tokens(nemo, np.concatenate([np.zeros(g.lead_in, np.float32), audio]))
    info = {"params_m": round(params / 1e6, 1), "file_mb": round(path.stat().st_size / 2**20, 1),
            "save_s": round(saved_s, 1), "load_s": round(loaded_s, 1),
            "reference_tokens": sum(len(t) for t in reference.values()), "streams": len(audios),
            "model_class": type(loaded.nemo_model).__name__, "lookaheads_ms": list(loaded.lookaheads_ms)}
    if spec.eou:
        info["eou"] = {p: loaded.pieces.index(p) for p in EOU_PIECES} | {"blank": loaded.blank_id,
                                                                          "vocabulary": len(loaded.pieces)}
    record(f"checkpoint_{name}", info)
    return name, path, loaded, audios, reference


@pytest.mark.parametrize("engine_name", ENGINES)
def test_saved_checkpoint_runs_on_every_engine_in_parity_with_nemo(checkpoint, engine_name, tmp_path, monkeypatch):
    name, path, loaded, audios, reference = checkpoint
    spec = PUBLISHED[name]
    assert all(len(t) > 0 for t in reference.values()), "NeMo emitted nothing: parity would be vacuous"
    device = "cpu" if engine_name == "onnx" else "cuda"
    # The engines share the one restored model, all in float32 (the factory moves it to the engine's
    # device; the weights stay exact); onnx runs last, since NeMo's export rewrites modules.
    import engines.factory as factory
    monkeypatch.setattr(factory, "load_model", lambda *a, **k: loaded)
    engine = build_on(str(path), engine_name, "float32", max_streams=len(audios), max_batch=len(audios),
                      lookahead_ms=spec.lookahead_ms, device=device, cache_dir=str(tmp_path))
    report = engine.startup_report
    assert report.engine == engine_name and not report.fell_back
    got = run_streams(engine, audios, seed=7)
    assert engine.executions()[engine_name] > 0

    class Ref:  # agreement() reads .tokens and .text
        def __init__(self, tokens):
            self.tokens, self.text = tokens, " ".join(map(str, tokens))

    a = agreement({s: Ref(t) for s, t in reference.items()},
                  {s: Ref(r.tokens) for s, r in got.items()})
    record(f"parity_{name}_{engine_name}", {**a.as_dict(), "self_check": report.self_check.detail
                                            if report.self_check else "reference engine"})
    if engine_name == "eager":
        assert a.token_edits == 0, a.as_dict()  # NeMo's own module: the same tokens, every one
    else:
        assert a.token_agreement >= 0.999, a.as_dict()


async def test_asr_server_serves_the_saved_checkpoint(checkpoint):
    name, path, _, audios, _ = checkpoint
    spec = PUBLISHED[name]
    proc, match, _ = await spawn_server("--model", str(path), "--lookahead-ms", str(spec.lookahead_ms),
                                        "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1",
                                        "--metrics-port", "0", "--max-streams", "16", "--max-batch", "16")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
            stub = pb_grpc.SpeechRecognitionStub(channel)

            async def one(i, audio):
                data = np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2").tobytes()

                async def gen():
                    for r in requests_for(data, seed=i):
                        yield r
                return final_transcript([r async for r in stub.StreamingRecognize(gen())])

            finals = await asyncio.gather(*(one(i, a) for i, a in enumerate(list(audios.values())[:4])))
            (model,) = (await stub.ListModels(pb.ListModelsRequest())).models
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 120)
    record(f"asr_server_{name}", {"engine": model.engine, "executions": dict(model.engine_executions),
                                  "finals": finals})
    assert model.engine == "fast-cudagraph" and model.engine_executions["fast-cudagraph"] > 0
    assert all(f.strip() for f in finals)
    assert code == 0
