"""Encoder engines: interchangeable ways to run one batched cache-aware encoder step.

Every engine takes NeMo's layouts (features [B, n_mels, T]; caches layer-major
[L, B, 70, d] and [L, B, d, k]) and returns (encoded [B, d, T'], encoded_len, next caches),
and counts its own executions where the computation really happens, so health and metrics can
report what ran rather than what was configured.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class PoolRows:
    """In place of a gathered attention cache: the slot pool's attention-cache tensor and the
    batch's slots in it, for an engine that reads each row's cache where it lies
    (`EncoderEngine.reads_cache_in_place`) instead of from a copy. The rows come in the pool's
    ring order; `step`'s `cache_head` gives each row's oldest frame."""

    pool: torch.Tensor    # [L, slots, C, ...] the pool's attention cache, every slot
    slots: torch.Tensor   # int64 [B] on the pool's device


class EncoderEngine:
    """Base: a name and an execution counter. Subclasses implement `_run`."""

    name = "base"

    def __init__(self, encoder: torch.nn.Module):
        self.encoder = encoder
        self._executions = 0
        self._lock = threading.Lock()

    @property
    def executions(self) -> int:
        with self._lock:
            return self._executions

    def _count(self) -> None:
        with self._lock:
            self._executions += 1

    # True where `step` takes `cache_head`: the attention cache rows in the slot pool's ring order
    accepts_ring_order = False
    # True where `step` also takes a PoolRows for `cache_channel` (with `cache_head`): the engine
    # reads the rows' attention caches out of the pool itself, and the pool skips their gather.
    reads_cache_in_place = False

    def step(self, feats, lengths, cache_channel, cache_time, cache_len, cache_head=None):
        if cache_head is None:
            return self._run(feats, lengths, cache_channel, cache_time, cache_len)
        if not self.accepts_ring_order:
            raise ValueError(f"the {self.name} encoder engine takes its attention cache in time order only")
        if isinstance(cache_channel, PoolRows) and not self.reads_cache_in_place:
            raise ValueError(f"the {self.name} encoder engine does not read its attention cache from the pool")
        return self._run(feats, lengths, cache_channel, cache_time, cache_len, cache_head=cache_head)

    def _run(self, feats, lengths, cache_channel, cache_time, cache_len):
        raise NotImplementedError


class EagerEncoder(EncoderEngine):
    """The reference: NeMo's own module, step by step in PyTorch eager mode."""

    name = "eager"

    def _run(self, feats, lengths, cache_channel, cache_time, cache_len):
        with torch.inference_mode():
            out = self.encoder.cache_aware_stream_step(
                processed_signal=feats, processed_signal_length=lengths,
                cache_last_channel=cache_channel, cache_last_time=cache_time,
                cache_last_channel_len=cache_len, keep_all_outputs=True)
        self._count()
        return out


class TRTEncoderWrapper(torch.nn.Module):
    """Stands in for NeMo's encoder with an exported-graph runner (TensorRT, or any callable
    with the exported graph's batch-first signature).

    The bug this project began from: a wrapper that only overrode `forward` let NeMo's
    streaming code call `encoder.cache_aware_stream_step`, which `__getattr__` found on the
    original encoder; its `self(...)` ran the original PyTorch forward and the engine never
    ran. This wrapper defines `cache_aware_stream_step` itself: its own `forward` runs the
    engine, then the original encoder's `streaming_post_process` trims outputs and caches.
    """

    def __init__(self, encoder: torch.nn.Module, runner: Callable):
        super().__init__()
        # Kept outside the module tree: the wrapper must never call into it by accident.
        object.__setattr__(self, "_original", encoder)
        self.runner = runner

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Attributes (streaming_cfg, d_model, ...) come from the original encoder; methods
            # that compute are defined here so they never fall through.
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, audio_signal, length, cache_last_channel, cache_last_time, cache_last_channel_len):
        # The exported graph takes and returns caches batch-first.
        outputs = self.runner(
            audio_signal, length, cache_last_channel.transpose(0, 1).contiguous(),
            cache_last_time.transpose(0, 1).contiguous(), cache_last_channel_len)
        encoded, encoded_len, cc_next, ct_next, ccl_next = outputs
        return encoded, encoded_len, cc_next.transpose(0, 1), ct_next.transpose(0, 1), ccl_next

    def cache_aware_stream_step(self, processed_signal, processed_signal_length=None, cache_last_channel=None,
                                cache_last_time=None, cache_last_channel_len=None, keep_all_outputs=True,
                                drop_extra_pre_encoded=None, bypass_pre_encode=False):
        if bypass_pre_encode:
            raise ValueError("the exported encoder graph includes the pre-encoder; bypass_pre_encode is unsupported")
        if drop_extra_pre_encoded is not None and drop_extra_pre_encoded != self._original.streaming_cfg.drop_extra_pre_encoded:
            raise ValueError("the exported encoder graph always drops the configured pre-encoded frames")
        rets = self.forward(processed_signal, processed_signal_length, cache_last_channel, cache_last_time,
                            cache_last_channel_len)
        return self._original.streaming_post_process(rets, keep_all_outputs=keep_all_outputs)


class WrappedGraphEncoder(EncoderEngine):
    """An encoder engine that runs an exported graph through TRTEncoderWrapper. The runner
    counts executions itself (see `CountingRunner`)."""

    def __init__(self, encoder: torch.nn.Module, runner: "CountingRunner", name: str):
        super().__init__(encoder)
        self.name = name
        self.runner = runner
        self.wrapper = TRTEncoderWrapper(encoder, runner)

    @property
    def executions(self) -> int:
        return self.runner.executions

    def _run(self, feats, lengths, cache_channel, cache_time, cache_len):
        with torch.inference_mode():
            return self.wrapper.cache_aware_stream_step(
                processed_signal=feats, processed_signal_length=lengths, cache_last_channel=cache_channel,
                cache_last_time=cache_time, cache_last_channel_len=cache_len, keep_all_outputs=True)


class CountingRunner:
    """Base for exported-graph runners: `execute` does the work; calls are counted after it
    returns, so the counter moves only when the graph really ran."""

    def __init__(self):
        self._executions = 0
        self._lock = threading.Lock()

    @property
    def executions(self) -> int:
        with self._lock:
            return self._executions

    def __call__(self, audio_signal, length, cache_last_channel, cache_last_time, cache_last_channel_len):
        out = self.execute(audio_signal, length, cache_last_channel, cache_last_time, cache_last_channel_len)
        with self._lock:
            self._executions += 1
        return out

    def execute(self, audio_signal, length, cache_last_channel, cache_last_time, cache_last_channel_len):
        raise NotImplementedError
