"""engines/step_attention.py: the fast step's attention kernel, which reads each row's cached K/V
where it lies (the slot pool's ring, or the workspace), against PyTorch's SDPA over a gathered
copy, and whole streams through StreamingEngine with the cache read in the pool (no gather)
against NeMo's own module. On a machine without a GPU the kernel runs under Triton's
interpreter, where Triton is installed (PyTorch's CPU wheels do not bring it; the test extra
installs it); the GPU suite runs it on the device (tests/gpu/test_gpu_fast_cudagraph.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from engines import step_attention
from engines.encoders import EagerEncoder, PoolRows
from engines.step_attention import CacheTable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _interpret(script: str, timeout: float = 600) -> str:
    """Runs `script` in a fresh interpreter with Triton's interpreter on (it must be on before
    the kernel is defined), returns its stdout; skips where Triton is not installed."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("Triton is not installed (PyTorch's CPU wheels do not bring it; `pip install -e .[dev]` does)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


KERNEL_AGAINST_SDPA = """
    import torch
    import torch.nn.functional as F
    from engines.step_attention import MASK_VALUE, CacheTable, StepShape, Tuning, step_attention

    def reference(qkv, pool_l, slots, heads, new, cache_len, enc_len, chunk_ok, shape):
        # The cache put in time order (stored position c holds time (c - head) mod C), the bias
        # written out: the positional term of query i and key time j is column T-1-i+j.
        T, C, d, H, Rp = shape.frames, shape.cache, shape.d_model, shape.n_heads, shape.rel_pad
        B, dk, N = slots.numel(), d // H, C + T
        time = (torch.arange(C)[None, :] + heads[:, None]) % C                      # [B, C] stored position of time j
        cached = pool_l[slots[:, None], time]                                        # [B, C, 2d] in time order
        kv = torch.cat([cached, new], 1).float()
        k = kv[..., :d].view(B, N, H, dk).transpose(1, 2)
        v = kv[..., d:].view(B, N, H, dk).transpose(1, 2)
        q = qkv[:, :d].float().reshape(B, T, H, dk).transpose(1, 2)
        pos = qkv[:, 3 * d:3 * d + H * Rp].float().reshape(B, T, H, Rp).transpose(1, 2)  # [B, H, T, Rp]
        i, j = torch.arange(T)[:, None], torch.arange(N)[None, :]
        bias = pos.gather(3, (T - 1 - i + j).expand(B, H, T, N))
        ok = (j[None] >= C - cache_len[:, None, None]) & (j[None] < C + enc_len[:, None, None]) & chunk_ok[None]
        bias = bias + torch.where(ok, 0.0, MASK_VALUE)[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)   # [B, T, H, dk]
        o = o * (torch.arange(T)[None, :] < enc_len[:, None])[..., None, None]
        return o.reshape(B * T, d)

    torch.manual_seed(0)
    worst = 0.0
    # (dtype, new frames, heads, head size, cached frames, launch): heads of a power of two and
    # not (12, 44: padded), the cache in one block and in several (an online softmax over blocks
    # of 16: 37 frames in three, the last part-full)
    # and the products on the tensor cores (dot) or as broadcast sums (fma: frames unpadded)
    whole, blocks = Tuning(block_n=0), Tuning(block_n=16, num_warps=2, num_stages=2, order="heads")
    fma_whole, fma_blocks = Tuning(products="fma"), Tuning(block_n=8, num_warps=2, products="fma")
    for dtype, T, H, dk, C, tune in [(torch.float32, 2, 4, 16, 11, whole), (torch.float32, 7, 2, 32, 11, whole),
                                     (torch.float16, 2, 2, 16, 11, whole), (torch.float16, 13, 2, 16, 11, whole),
                                     (torch.float32, 2, 2, 12, 37, blocks), (torch.float16, 7, 2, 44, 37, blocks),
                                     (torch.float32, 3, 2, 16, 37, whole), (torch.float32, 2, 2, 12, 37, fma_blocks),
                                     (torch.float16, 2, 2, 44, 37, fma_whole), (torch.float16, 7, 2, 16, 11, fma_blocks)]:
        L, S, B = 2, 9, 5
        d, Rp = H * dk, -(-(C + 2 * T - 1) // 8) * 8
        shape = StepShape(frames=T, cache=C, d_model=d, n_heads=H, rel_pad=Rp)
        pool = torch.randn(L, S, C, 2 * d).to(dtype)
        slots = torch.tensor([8, 0, 3, 3, 5])                # any order, a slot twice (padding rows)
        heads = torch.tensor([0, 4, 10, 1, 7])               # ring heads
        cache_len = torch.tensor([C, 0, 5, C, 2])            # full, empty (a fresh stream), partial
        enc_len = torch.tensor([T, T, T - 1, 0, T])          # a short chunk, a row with no new frame
        qkv = torch.randn(B * T, 3 * d + H * Rp + 5).to(dtype)   # the fused GEMM's output, wider than needed
        new = torch.randn(B, T, 2 * d).to(dtype)
        qi = torch.arange(T)[:, None] // 2
        kj = torch.arange(C + T)[None, :]
        chunk_ok = (kj // 2 <= qi + C // 2) & (kj // 2 >= qi + C // 2 - 4)   # a chunked visibility
        table = CacheTable.empty(L, torch.device("cpu"))
        table.point_at(pool)
        for layer in range(L):
            got = step_attention(qkv, new, table, layer, slots, heads, cache_len, enc_len,
                                 chunk_ok.to(torch.int8).contiguous(), shape, tuning=tune)
            want = reference(qkv, pool[layer], slots, heads, new, cache_len, enc_len, chunk_ok, shape)
            err = (got.float() - want).abs().max().item()
            worst = max(worst, err)
            assert err <= (1e-5 if dtype == torch.float32 else 4e-3), (dtype, T, dk, C, tune, layer, err)
            assert got[3 * T:4 * T].abs().max().item() == 0.0  # no new frame: zero out, as NeMo's
        # The table follows a new pool without anything else changing.
        other = torch.randn(L, S + 3, C, 2 * d).to(dtype)
        table.point_at(other)
        args = (slots, heads, cache_len, enc_len, chunk_ok.to(torch.int8).contiguous(), shape)
        got = step_attention(qkv, new, table, 1, *args)
        want_other = reference(qkv, other[1], slots, heads, new, cache_len, enc_len, chunk_ok, shape)
        want_old = reference(qkv, pool[1], slots, heads, new, cache_len, enc_len, chunk_ok, shape)
        assert (got.float() - want_other).abs().max().item() <= 4e-3
        assert (got.float() - want_old).abs().max().item() > 1e-2
        # Heads matter: the same rows read as if in time order differ.
        wrong = step_attention(qkv, new, table, 1, slots, torch.zeros_like(heads), *args[2:])
        assert (wrong.float() - want_other).abs().max().item() > 1e-2
    print("ok", worst)
"""


def test_the_kernel_equals_sdpa_over_a_gathered_copy_under_the_interpreter():
    out = _interpret(KERNEL_AGAINST_SDPA)
    assert out.startswith("ok"), out


STREAMS_IN_PLACE = """
    import torch
    from engines.config import EngineConfig
    from engines.factory import build_engine
    from engines.fast_engines import FastCudaGraphEncoder
    from engines.models import speechlike_audio
    from engines.streaming_engine import StreamingEngine
    from tests.conftest import _quiet_nemo
    from tests.engine_helpers import run_alone, run_streams

    _quiet_nemo()
    # 0.05 s: shorter than a chunk; 6.3 s: past one turn of the 70-frame ring at 160 ms (35 steps).
    # (lookahead, streams, ring cache on/off, rounds: a second round reuses the first's slots)
    cases = {160: ([0.05, 0.9, 1.37, 6.3], {True: 2}), 560: ([0.4, 2.05, 3.1], {True: 1, False: 1})}
    for la, (secs, rings) in cases.items():
        eager = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                          lookahead_ms=la, max_streams=16, max_batch=8))
        audios = {f"s{i}": speechlike_audio(s, seed=500 + i) for i, s in enumerate(secs)}
        want = {sid: run_alone(eager, a, sid) for sid, a in audios.items()}
        enc = eager.model.nemo_model.encoder
        for ring, rounds in rings.items():
            # read in the pool with the fused element-wise kernels too (engines/fused_norms.py); gathered without
            # read in the pool: no workspace for the cache at all (the default with the kernel)
            graph_eng = FastCudaGraphEncoder(enc, max_batch=8, use_graphs=False, buckets=(2, 4), attention="kernel",
                                             fused_norms=ring, workspace_cache=None if ring else True)
            assert graph_eng.workspace_cache == (not ring)
            assert graph_eng.parts.fused == ring
            engine = StreamingEngine(eager.model, graph_eng, la, capacity=16, max_batch=8,
                                     device=torch.device("cpu"), dtype=torch.float32, ring_cache=ring)
            assert engine.cache_in_place == ring
            C = graph_eng.params.geo.cache
            for round_ in range(rounds):
                got = run_streams(engine, audios, seed=7 + round_, start_step={sid: i % 3 for i, sid in enumerate(audios)})
                for sid, ref in want.items():
                    assert ref.tokens, ("no exactness over an empty transcript", sid)
                    assert got[sid].tokens == ref.tokens, (la, ring, round_, sid)
                    for a, b in zip(got[sid].encoded, ref.encoded):
                        err = (a - b).abs().max().item() if a.numel() else 0.0
                        assert err <= 1e-4, (la, ring, sid, err)
            # Read in the pool, the workspace has no room for the cache (so the tokens above came
            # from the pool); gathered, its cache frames were written.
            frames = graph_eng.buffers.kv_work.shape[2]
            if ring:
                assert frames == graph_eng.params.geo.frames_out, (la, frames)
            else:
                assert frames == C + graph_eng.params.geo.frames_out
                assert int(torch.count_nonzero(graph_eng.buffers.kv_work[:, :, :C])) > 0, la
            assert engine.slots_in_use() == 0
    print("ok")
"""


SELF_CHECK_IN_PLACE = """
    import torch
    from engines.config import EngineConfig
    from engines.factory import build_engine
    from engines.fast_engines import FastCudaGraphEncoder
    from engines.selfcheck import check_encoder_engine
    from tests.conftest import _quiet_nemo

    _quiet_nemo()
    eager = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                      lookahead_ms=160, max_streams=4, max_batch=4))
    enc = eager.model.nemo_model.encoder
    cpu = torch.device("cpu")
    engine = FastCudaGraphEncoder(enc, max_batch=4, use_graphs=False, buckets=(4,), attention="kernel")
    assert engine.needs_cache_in_place
    check = check_encoder_engine(engine, eager.model, cpu, torch.float32, 4, steps=4)
    assert check.passed, check.detail
    assert check.executions_after - check.executions_before == 4
    # the check reads what the kernel computes: a kernel that attends to a wrong cache fails it
    real = engine.buffers.read_cache_from_pool
    def stale(rows, b):  # every row's cache read from slot 0's
        real(type(rows)(rows.pool, torch.zeros_like(rows.slots)), b)
    engine.buffers.read_cache_from_pool = stale
    bad = check_encoder_engine(engine, eager.model, cpu, torch.float32, 4, steps=4)
    assert not bad.passed, bad.detail
    print("ok", check.detail, "|", bad.detail)
"""


def test_the_start_up_self_check_gives_the_kernel_its_cache_in_a_slot_pool_under_the_interpreter():
    """The attention kernel's engine keeps no room for a gathered cache, so the start-up
    self-check hands it the rows' caches as a slot pool's ring (PoolRows and heads, its new
    frames committed after each step), as the server does: it passes against NeMo, and it
    fails where the kernel reads the wrong rows. (Before, the check handed it a gathered cache,
    and every server with --step-kernels triton refused to start: run 42.)"""
    out = _interpret(SELF_CHECK_IN_PLACE)
    assert out.strip().startswith("ok"), out


def test_streams_with_the_cache_read_in_the_pool_decode_as_nemo_does_under_the_interpreter():
    """Whole streams at 160 and 560 ms, in mixed batches at different positions, slots reused
    (160 ms), one stream past a turn of the ring: with the attention kernel reading the pool's
    ring in place (no gather: the workspace's cache frames stay zero) and the fused element-wise
    kernels (engines/fused_norms.py), and (560 ms) with the attention kernel reading a gathered
    workspace (ring_cache off), each stream's tokens are NeMo's alone and its encoder outputs
    within 1e-4."""
    out = _interpret(STREAMS_IN_PLACE, timeout=900)
    assert out.strip().endswith("ok"), out


def test_without_triton_or_a_device_the_kernel_says_why_it_cannot_serve(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = step_attention.supports(16, torch.float32, torch.device("cpu"))
    assert why is not None and "Triton" in why
    monkeypatch.setattr(step_attention, "available", lambda device: True)
    assert step_attention.supports(16, torch.float16, torch.device("cpu")) is None
    # any head size: the kernel pads a head to a power of two (the demo model's heads are 44 wide)
    assert step_attention.supports(44, torch.float16, torch.device("cpu")) is None
    assert step_attention.supports(8, torch.float16, torch.device("cpu")) is None
    assert "CUDA" in step_attention.supports(64, torch.float32, torch.device("cuda"))


def test_the_cache_table_names_a_tensor_by_its_addresses_and_checks_its_layout():
    table = CacheTable.empty(3, torch.device("cpu"))
    pool = torch.zeros(3, 5, 4, 8)
    table.point_at(pool)
    assert table.table.tolist() == [pool[i].data_ptr() for i in range(3)] + [pool.stride(1)]
    work = torch.zeros(3, 7, 6, 8)  # a workspace: 6 frames a row, of which the first 4 are the cache
    table.point_at(work)
    assert table.table.tolist() == [work[i].data_ptr() for i in range(3)] + [6 * 8]
    table.table.zero_()
    table.point_at(work)  # already named: nothing written
    assert table.table.count_nonzero() == 0
    with pytest.raises(ValueError, match="contiguous frames"):
        table.point_at(torch.zeros(3, 5, 8, 4).transpose(2, 3))
    with pytest.raises(ValueError, match="L=3"):
        table.point_at(torch.zeros(2, 5, 4, 8))


def test_an_engine_that_does_not_read_the_pool_refuses_pool_rows():
    class Probe(EagerEncoder):
        accepts_ring_order = True

    rows = PoolRows(torch.zeros(2, 3, 4, 8), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="does not read its attention cache from the pool"):
        Probe(torch.nn.Identity()).step(None, None, rows, None, None, cache_head=torch.zeros(2, dtype=torch.int64))


def test_the_fast_graph_engine_refuses_the_kernel_where_it_cannot_run(monkeypatch):
    from engines.config import EngineConfig
    from engines.factory import build_engine
    from engines.fast_conformer import UnsupportedEncoder
    from engines.fast_engines import FastCudaGraphEncoder

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    eager = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                      lookahead_ms=160, max_streams=4, max_batch=2))
    with pytest.raises(UnsupportedEncoder, match="attention kernel"):
        FastCudaGraphEncoder(eager.model.nemo_model.encoder, max_batch=2, use_graphs=False, attention="kernel")
    with pytest.raises(ValueError, match="attention must be one of"):
        FastCudaGraphEncoder(eager.model.nemo_model.encoder, max_batch=2, use_graphs=False, attention="flash")


def test_an_engine_without_a_workspace_for_the_cache_is_served_from_the_ring_only(monkeypatch):
    """The kernel's engine keeps no room for the gathered cache (7 MB a row for the 0.6B model):
    a StreamingEngine that would gather into it (ring off) is refused at construction, a step
    handed a gathered cache is refused, and SDPA cannot be built without the room."""
    from engines import fast_engines
    from engines.config import EngineConfig
    from engines.factory import build_engine
    from engines.fast_engines import FastCudaGraphEncoder
    from engines.streaming_engine import StreamingEngine

    monkeypatch.setattr(fast_engines, "step_attention_supports", lambda *a: None)
    eager = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                      lookahead_ms=160, max_streams=4, max_batch=2))
    enc = FastCudaGraphEncoder(eager.model.nemo_model.encoder, max_batch=2, use_graphs=False, attention="kernel")
    g = enc.params.geo
    assert not enc.workspace_cache and enc.buffers.kv_work.shape[2] == g.frames_out
    roomy = FastCudaGraphEncoder(eager.model.nemo_model.encoder, max_batch=2, use_graphs=False, attention="kernel",
                                 workspace_cache=True)
    assert enc.buffers.nbytes() < roomy.buffers.nbytes() - enc.buffers.kv_work.numel() * 4  # the cache part is gone
    with pytest.raises(ValueError, match="ring_cache must be on"):
        StreamingEngine(eager.model, enc, 160, capacity=4, max_batch=2, device=torch.device("cpu"),
                        dtype=torch.float32, ring_cache=False)
    assert StreamingEngine(eager.model, enc, 160, capacity=4, max_batch=2, device=torch.device("cpu"),
                           dtype=torch.float32).cache_in_place
    feats = torch.zeros(1, g.n_mels, g.frames_in)
    cc = torch.zeros(g.n_layers, 1, g.cache, 2 * g.d_model)
    ct = torch.zeros(g.n_layers, 1, g.d_model, g.conv_cache)
    with pytest.raises(ValueError, match="no workspace for the attention cache"):
        enc.step(feats, torch.tensor([g.frames_in]), cc, ct, torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="workspace_cache must be on"):
        FastCudaGraphEncoder(eager.model.nemo_model.encoder, max_batch=2, use_graphs=False, workspace_cache=False)


def test_a_server_asking_for_the_triton_kernels_where_they_cannot_run_keeps_torchs_and_says_why(monkeypatch, caplog):
    """`--step-kernels triton` through the factory: where Triton cannot serve (here: no
    interpreter, no CUDA), or building with the kernels fails, the graph engine is built with
    PyTorch's kernels and a warning says why; options that name the kernels (the benchmarks')
    raise instead."""
    import types

    from engines import fast_engines
    from engines.config import EngineConfig
    from engines.factory import build_engine

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    eager = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                      lookahead_ms=160, max_streams=4, max_batch=2))
    built = []

    class Recorder(fast_engines.FastCudaGraphEncoder):
        fail_kernels = False

        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("attention", "sdpa"))
            if self.fail_kernels and kwargs.get("attention") == "kernel":
                raise RuntimeError("a compiler problem at the warm-up")  # as the first launch would raise
            super().__init__(*args, use_graphs=False, **kwargs)

    monkeypatch.setattr(fast_engines, "FastCudaGraphEncoder", Recorder)
    cfg = types.SimpleNamespace(step_kernels="triton", max_batch=2)
    with caplog.at_level("WARNING", logger="engines.fast_engines"):
        engine = fast_engines.build_fast_encoder(eager.model, cfg, torch.device("cpu"), torch.float32, graphs=True)
    assert engine.attention == "sdpa" and not engine.parts.fused and built == ["sdpa"]
    assert "cannot serve here" in caplog.text and "Triton" in caplog.text
    # "auto" on a machine where Triton cannot serve: PyTorch's kernels, said at info, no warning
    built.clear()
    caplog.clear()
    with caplog.at_level("INFO", logger="engines.fast_engines"):
        engine = fast_engines.build_fast_encoder(eager.model, types.SimpleNamespace(step_kernels="auto", max_batch=2),
                                                 torch.device("cpu"), torch.float32, graphs=True)
    assert engine.attention == "sdpa" and built == ["sdpa"]
    assert [r.levelname for r in caplog.records if "cannot serve here" in r.getMessage()] == ["INFO"]
    # Triton said to serve, but the build fails: PyTorch's kernels, and the failure in the warning.
    monkeypatch.setattr(fast_engines, "step_attention_supports", lambda *a: None)
    Recorder.fail_kernels = True
    built.clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger="engines.fast_engines"):
        engine = fast_engines.build_fast_encoder(eager.model, cfg, torch.device("cpu"), torch.float32, graphs=True)
    assert built == ["kernel", "sdpa"] and engine.attention == "sdpa"
    assert "building with them failed: RuntimeError: a compiler problem" in caplog.text
    # "auto" where Triton serves: the kernels (and a build that fails is a warning, as asked for)
    Recorder.fail_kernels = False
    built.clear()
    auto = types.SimpleNamespace(step_kernels="auto", max_batch=2)
    engine = fast_engines.build_fast_encoder(eager.model, auto, torch.device("cpu"), torch.float32, graphs=True)
    assert built == ["kernel"] and engine.attention == "kernel"
    Recorder.fail_kernels = True
    caplog.clear()
    with caplog.at_level("WARNING", logger="engines.fast_engines"):
        engine = fast_engines.build_fast_encoder(eager.model, auto, torch.device("cpu"), torch.float32, graphs=True)
    assert engine.attention == "sdpa" and "building with them failed" in caplog.text
    with pytest.raises(RuntimeError, match="compiler problem"):
        fast_engines.build_fast_encoder(eager.model, cfg, torch.device("cpu"), torch.float32, graphs=True,
                                        attention="kernel")


def test_a_launch_is_read_from_its_text_and_the_environment_overrides_the_default():
    parsed = step_attention.parse_tuning("few=32/4/2/fma, many=0/8/1")
    assert parsed == {"few": step_attention.Tuning(32, 4, 2, "fma"), "many": step_attention.Tuning(0, 8, 1, "dot")}
    heads = step_attention.parse_tuning("many=16/2/1/dot/heads")["many"]
    assert heads == step_attention.Tuning(16, 2, 1, "dot", "heads")
    assert step_attention.parse_tuning("few=" + step_attention.format_tuning(heads))["few"] == heads
    assert step_attention.parse_tuning("") == {}
    for bad in ("few=32/4", "most=32/4/2", "few=a/4/2", "few=32/4/2/mma", "few=32/4/2/fma/1", "few=32/4/2/heads",
                "few=32/4/2/dot/heads/1"):
        with pytest.raises(ValueError, match="BLOCK_N/WARPS/STAGES"):
            step_attention.parse_tuning(bad)
    # a fresh interpreter (the module reads the variable once, at import, as an engine worker does)
    with pytest.raises(ValueError, match="power of two"):
        step_attention.Tuning(block_n=24)
    env = dict(os.environ, **{step_attention.TUNING_ENV: "many=16/2/3"})
    done = subprocess.run([sys.executable, "-c", "from engines import step_attention as s; "
                           "print(s.tuning_for(7), s.tuning_for(2))"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("Tuning(")[1:] == [  # the one named changed, the other as it was
        "block_n=16, num_warps=2, num_stages=3, products='dot', order='rows') ",
        repr(step_attention.TUNING["few"])[len("Tuning("):] + "\n"]
