"""Start-up self-check: the configured encoder engine must run, and agree with the eager
reference, before the server takes traffic.

The seed's failure was an engine that was configured, reported, and never executed. Here an
engine passes only if (1) its own execution counter moved for every step it was given, and
(2) its outputs match NeMo's eager module on the same inputs within a tolerance for the dtype.

The inputs: a few streams at different positions (each starts one step after the previous,
so their caches are at different fill levels), fed log-mel features of speech-like audio,
for a few steps; each engine carries its own caches from step to step (an engine may keep its
cache in its own layout), and the encoder outputs are compared at every step, the caches too
where the layouts agree. The last step gives the last stream a short chunk. An engine that reads
the attention cache where it lies in the slot pool (`needs_cache_in_place`: the attention
kernel's, which keeps no room for a gathered copy) is given its cache the way the server gives
it: rows of a slot pool's ring, which its new frames are committed into after each step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engines.encoders import EagerEncoder, EncoderEngine, PoolRows
from engines.export import encoder_io
from engines.models import LoadedModel, speechlike_audio
from engines.slot_pool import SlotPool, StateSpec

log = logging.getLogger(__name__)

# max |engine - eager| / max |eager| allowed, by compute dtype
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class SelfCheck:
    engine: str
    passed: bool
    steps: int
    rows: int
    executions_before: int
    executions_after: int
    max_rel_error: float      # over the encoder outputs (and the caches where comparable)
    max_abs_error: float
    tolerance: float
    detail: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _features(model: LoadedModel, rows: int, steps: int, device: torch.device) -> list[torch.Tensor]:
    """Per step, [rows, n_mels, frames_in] float32 log-mel windows of speech-like audio."""
    io = encoder_io(model)
    cs = model.nemo_model.encoder.streaming_cfg.chunk_size
    chunk = cs[1] if isinstance(cs, (list, tuple)) else cs
    need_frames = io.frames_in + chunk * (steps + rows)
    seconds = (need_frames + 2) * 0.01 + 0.1
    audio = torch.from_numpy(speechlike_audio(seconds, seed=1234))[None].to(device)
    pre = model.nemo_model.preprocessor
    with torch.inference_mode():
        mel, _ = pre(input_signal=audio, length=torch.tensor([audio.shape[1]], device=device))
    mel = mel[0].float()  # [n_mels, N]
    out = []
    for s in range(steps):
        windows = []
        for r in range(rows):
            start = (s + 2 * r) * chunk  # rows read different audio
            windows.append(mel[:, start:start + io.frames_in])
        out.append(torch.stack(windows))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf"), float("inf")
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    return err / max(scale, 1e-6), err


def check_encoder_engine(engine: EncoderEngine, model: LoadedModel, device: torch.device, dtype: torch.dtype,
                         max_batch: int, steps: int = 3) -> SelfCheck:
    """Run `steps` steps through `engine` and the eager reference; never raises for a wrong
    or silent engine (the result says so), only for a failure to run at all."""
    enc = model.nemo_model.encoder
    io = encoder_io(model)
    rows = max(1, min(3, max_batch))
    tol = TOLERANCE.get(dtype, 2e-2)
    reference = EagerEncoder(enc)
    feats = _features(model, rows, steps, device)
    state_ref = [t.to(device) for t in enc.get_initial_cache_state(batch_size=rows, dtype=dtype, device=device)]
    channel_shape = getattr(engine, "cache_channel_shape", None)
    if channel_shape:
        cc0 = torch.zeros((channel_shape[0], rows, *channel_shape[1:]), dtype=dtype, device=device)
        state_eng = [cc0] + [t.clone() for t in state_ref[1:]]
    else:
        state_eng = [t.clone() for t in state_ref]
    pool = _ring_pool(engine, rows, dtype, device)
    slots = torch.arange(rows, device=device)
    before = engine.executions
    worst_rel, worst_abs, where = 0.0, 0.0, ""
    for s in range(steps):
        x = feats[s].to(dtype)
        lengths = torch.full((rows,), io.frames_in, dtype=torch.int64, device=device)
        if s == steps - 1 and rows > 1:
            lengths[-1] = io.frames_in - 3  # a short last chunk
        for st in (state_ref, state_eng):
            for r in range(s + 1, rows):  # streams that have not started yet are fresh
                st[0][:, r].zero_()
                st[1][:, r].zero_()
                st[2][r] = 0
        fresh = torch.arange(rows) > s
        with torch.inference_mode():
            ref = [t.clone() for t in reference.step(x, lengths, *state_ref)]
            if pool is None:
                got = [t.clone() for t in engine.step(x, lengths, *state_eng)]
            else:
                ring = pool.tensors["cache_channel"]
                ring[:, fresh.to(device)] = 0
                got = [t.clone() for t in engine.step(x, lengths, PoolRows(ring, slots), *state_eng[1:],
                                                      cache_head=pool.heads_of("cache_channel", slots))]
                # the new frames into the ring, as the server commits them; a fresh row's whole
                pool.commit(slots, pool.stage({"cache_channel": got[2]}, restart=(fresh | (s == 0)).numpy()))
        if not torch.equal(got[1].long().cpu(), ref[1].long().cpu()):
            return _result(engine, False, steps, rows, before, worst_rel, worst_abs, tol,
                           f"step {s}: encoded lengths {got[1].tolist()} != eager {ref[1].tolist()}")
        n = int(ref[1].max())
        if tuple(got[0].shape[:2]) != tuple(ref[0].shape[:2]) or got[0].shape[2] < n:
            return _result(engine, False, steps, rows, before, worst_rel, worst_abs, tol,
                           f"step {s}: encoded shape {tuple(got[0].shape)} != eager {tuple(ref[0].shape)}")
        mask = torch.arange(n, device=device)[None, None, :] < ref[1].to(device)[:, None, None]
        pairs = [("encoded", got[0][..., :n] * mask, ref[0][..., :n] * mask)]
        if got[2].shape == ref[2].shape:
            pairs.append(("cache_last_channel", got[2], ref[2]))
        pairs.append(("cache_last_time", got[3], ref[3]))
        for name, a, b in pairs:
            rel, abs_ = _rel(a, b)
            if rel > worst_rel:
                worst_rel, worst_abs, where = rel, abs_, f"{name} at step {s}"
        if not torch.equal(got[4].long().cpu(), ref[4].long().cpu()):
            return _result(engine, False, steps, rows, before, worst_rel, worst_abs, tol,
                           f"step {s}: cache lengths {got[4].tolist()} != eager {ref[4].tolist()}")
        state_ref = [t.clone() for t in ref[2:]]
        state_eng = [t.clone() for t in got[2:]]
    after = engine.executions
    if after - before < steps:
        return _result(engine, False, steps, rows, before, worst_rel, worst_abs, tol,
                       f"the {engine.name} engine's execution counter moved {after - before} times for "
                       f"{steps} steps: it did not run (something else computed its outputs)", after)
    if not worst_rel <= tol:
        return _result(engine, False, steps, rows, before, worst_rel, worst_abs, tol,
                       f"outputs differ from the eager reference: relative error {worst_rel:.3g} "
                       f"(abs {worst_abs:.3g}) in {where} exceeds {tol:g}", after)
    return _result(engine, True, steps, rows, before, worst_rel, worst_abs, tol,
                   f"ok: {steps} steps, {rows} streams, max relative error {worst_rel:.3g} ({where or 'exact'})",
                   after)


def _ring_pool(engine: EncoderEngine, rows: int, dtype: torch.dtype, device: torch.device) -> SlotPool | None:
    """For an engine that reads its attention cache in the slot pool (and has no room to be given
    a gathered copy), a pool of `rows` slots keeping that cache as the server's ring; else None."""
    if not getattr(engine, "needs_cache_in_place", False):
        return None
    shape = tuple(engine.cache_channel_shape)
    return SlotPool([StateSpec("cache_channel", shape, 1, dtype, ring_shift=int(engine.cache_shift_frames))],
                    rows, device)


def _result(engine, passed, steps, rows, before, rel, abs_, tol, detail, after=None) -> SelfCheck:
    return SelfCheck(engine=engine.name, passed=passed, steps=steps, rows=rows, executions_before=before,
                     executions_after=engine.executions if after is None else after,
                     max_rel_error=float(rel), max_abs_error=float(abs_), tolerance=tol, detail=detail)
