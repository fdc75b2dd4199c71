"""Drivers for engine tests: run streams through StreamingEngine.step alone or in mixed batches,
recording each stream's tokens, text and encoder outputs."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from engines.api import ChunkWork, EndpointingParams, StepPlan


@dataclass
class StreamRun:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    encoded: list[torch.Tensor] = field(default_factory=list)  # per chunk [d, T'] (valid frames)
    final: bool = False
    chunks: int = 0
    token_frames: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # endpointing: speech starts (stream frames)
    ends: list[int] = field(default_factory=list)    # endpointing: utterance ends (stream frames)
    new_utterance: bool = False                      # the next chunk starts a new utterance


class EncoderRecorder:
    """Wraps an engine's encoder step to keep each row's valid encoder output."""

    def __init__(self, engine):
        self.engine = engine
        self.rows: list[torch.Tensor] = []
        self._inner = engine.encoder_engine.step

    def __enter__(self):
        def recording_step(*args, **kwargs):
            out = self._inner(*args, **kwargs)
            encoded, enc_len = out[0], out[1]
            lengths = torch.clamp(enc_len, max=self.engine.geometry.encoder_frames)
            self.rows = [encoded[i, :, : int(lengths[i])].detach().float().cpu() for i in range(encoded.shape[0])]
            return out
        self.engine.encoder_engine.step = recording_step
        return self

    def __exit__(self, *exc):
        self.engine.encoder_engine.step = self._inner


def run_alone(engine, audio: np.ndarray, stream_id: str = "alone") -> StreamRun:
    slot = engine.acquire_slot()
    try:
        return run_streams(engine, {stream_id: audio}, slots={stream_id: slot}, seed=None)[stream_id]
    finally:
        engine.release_slot(slot)


def run_streams(engine, audios: dict[str, np.ndarray], slots: dict[str, int] | None = None,
                seed: int | None = 0, start_step: dict[str, int] | None = None,
                max_batch: int | None = None, endpointing: EndpointingParams | None = None) -> dict[str, StreamRun]:
    """Run every stream to its final, at most one chunk per stream per step. With a seed, each
    step takes a random subset of the ready streams in a shuffled order (mixed positions);
    `start_step` delays a stream's first chunk. With `endpointing`, every stream asks for it
    and the chunk after an utterance's end starts the next utterance, as the scheduler does."""
    g = engine.geometry
    rng = random.Random(seed)
    own_slots = slots is None
    slots = dict(slots or {sid: engine.acquire_slot() for sid in audios})
    runs = {sid: StreamRun() for sid in audios}
    for sid, audio in audios.items():  # less than one frame of audio: nothing to run
        runs[sid].final = g.total_chunks(len(audio)) == 0
    start_step = start_step or {}
    max_batch = max_batch or engine.max_batch
    step = 0
    try:
        with EncoderRecorder(engine) as rec:
            while not all(r.final for r in runs.values()):
                ready = [sid for sid in audios if not runs[sid].final and start_step.get(sid, 0) <= step]
                if seed is not None:
                    rng.shuffle(ready)
                    ready = ready[: rng.randint(1, max(1, min(len(ready), max_batch)))] if ready else []
                else:
                    ready = ready[:max_batch]
                chunks = []
                for sid in ready:
                    r, audio = runs[sid], audios[sid]
                    span = g.chunk_span(r.chunks, len(audio), ended=True)
                    assert span is not None
                    a, b = span
                    # Only the stream's last chunk may say the audio ended (the engine frames
                    # the end of audio from it); a full chunk can be the last one.
                    last = r.chunks == g.total_chunks(len(audio)) - 1
                    chunks.append(ChunkWork(sid, slots[sid], audio[a:b], first=r.chunks == 0,
                                            audio_ended=last, endpointing=endpointing if r.chunks == 0 else None,
                                            new_utterance=r.new_utterance))
                step += 1
                if not chunks:
                    continue
                result = engine.step(StepPlan(tuple(chunks)))
                assert [u.stream_id for u in result.updates] == [c.stream_id for c in chunks]
                for u, row in zip(result.updates, rec.rows):
                    r = runs[u.stream_id]
                    r.tokens += [t.token_id for t in u.tokens]
                    r.token_frames += [t.frame for t in u.tokens]
                    r.starts += u.starts
                    r.ends += u.ends
                    r.new_utterance = bool(u.ends)
                    r.text += u.text_delta
                    r.encoded.append(row)
                    r.final = u.is_final
                    r.chunks += 1
    finally:
        if own_slots:
            for s in slots.values():
                engine.release_slot(s)
    return runs


def nemo_reference_tokens(model, audio: np.ndarray) -> list[int]:
    """NeMo's own streaming loop, pad-and-drop convention, over the preprocessor's valid frames.

    (CacheAwareStreamingAudioBuffer.append_audio keeps one more frame than the preprocessor's
    seq_len: the STFT's last frame, which the preprocessor masks to zeros. We decode the valid
    frames, as offline transcription does, so the reference is given exactly those.)"""
    from nemo.collections.asr.parts.utils.streaming_utils import CacheAwareStreamingAudioBuffer

    buf = CacheAwareStreamingAudioBuffer(model=model, pad_and_drop_preencoded=True)
    with torch.inference_mode():
        feats, n = buf.preprocess_audio(audio)
    buf.append_processed_signal(feats[:, :, : int(n[0])])
    cc, ct, ccl = model.encoder.get_initial_cache_state(batch_size=1)
    hyps = None
    with torch.inference_mode():
        for chunk, length in buf:
            out = model.conformer_stream_step(
                processed_signal=chunk, processed_signal_length=length, cache_last_channel=cc,
                cache_last_time=ct, cache_last_channel_len=ccl, keep_all_outputs=buf.is_buffer_empty(),
                previous_hypotheses=hyps, return_transcription=True)
            hyps, cc, ct, ccl = out[1], out[2], out[3], out[4]
    return hyps[0].y_sequence.tolist()


def length_nemo_fully_consumes(geometry, seconds: float) -> int:
    """NeMo's buffer skips a last chunk shorter than 8 mel frames (we decode it): pick a length
    whose last chunk is long enough that both see the same frames."""
    n = int(seconds * geometry.sample_rate)
    while True:
        frames = geometry.n_frames(n)
        tail = frames - (geometry.total_chunks(n) - 1) * geometry.chunk_frames
        if tail >= 8:
            return n
        n += geometry.hop
