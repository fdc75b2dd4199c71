"""A deterministic fake StreamingEngine for scheduler, server and client tests (no torch, fast).

Each slot carries a hash chain over its stream's chunks: chunk k's tokens are derived from
blake2b(previous digest, k, the chunk's samples). So a transcript depends on the audio, on how
it is split into chunk spans, and on chunk order: a scheduler that reorders chunks, skips or
repeats one, mixes two streams' samples or slots, or splits spans other than
ChunkGeometry.chunk_span says, produces a different transcript than `transcribe_alone`.

It also polices the contract: a slot must be acquired before use and owned by one stream from
its `first` chunk on, a step must not run concurrently with another, a plan holds one chunk
per stream; violations raise EngineError (counted in `violations`), invalid audio raises
BadChunkError before any state changes, exactly as the real engines promise.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

from engines.api import (
    BadChunkError,
    ChunkWork,
    EngineError,
    ModelInfo,
    PoolExhaustedError,
    StepPlan,
    StepResult,
    StepTimings,
    StreamUpdate,
    TokenEvent,
)
from engines.config import LOOKAHEAD_TO_RIGHT_CONTEXT, EngineConfig
from engines.geometry import ChunkGeometry

# SentencePiece-style pieces: "▁" starts a word.
PIECES = ("▁the", "▁a", "▁cat", "s", "▁sat", "▁on", "ing", "▁mat", "▁dog", "ed",
          "▁run", "▁blue", "er", "▁sky", "ly", "▁go")
ENGINE_NAME = "fake"


def fake_geometry(lookahead_ms: int = 160, sample_rate: int = 16000) -> ChunkGeometry:
    """The geometry of a Nemotron-like model: 10 ms hop, 512-point centred STFT, 8x subsampling."""
    right = LOOKAHEAD_TO_RIGHT_CONTEXT[lookahead_ms]
    return ChunkGeometry(
        sample_rate=sample_rate, hop=sample_rate // 100, n_fft=512, stft_left_pad=256,
        chunk_frames=8 * (right + 1), pre_encode_frames=9, encoder_frames=right + 1,
        subsampling=8, lookahead_ms=lookahead_ms,
    )


@dataclass
class _Slot:
    owner: str | None = None
    digest: bytes = b""
    chunks: int = 0
    samples: int = 0
    finished: bool = False
    has_text: bool = False
    endpointing: bool = False  # the stream asked for utterances
    in_speech: bool = False


class FakeEngine:
    def __init__(self, capacity: int = 64, max_batch: int = 32, lookahead_ms: int = 160,
                 step_delay_s: float = 0.0, name: str = ENGINE_NAME, tokens_per_chunk: int | None = None):
        self.geometry = fake_geometry(lookahead_ms)
        self.capacity = capacity
        self.max_batch = max_batch
        self.name = name
        self.step_delay_s = step_delay_s
        # None: 0-2 tokens a chunk from the hash (a trained model's rate is below one); a number:
        # exactly that many, as a random-weight model emits (builtin:nemotron-0.6b gives about its
        # max_symbols x frames a chunk, 6 at 160 ms), for benchmarks of the per-token host work.
        if tokens_per_chunk is not None and not 0 <= tokens_per_chunk <= 15:
            raise ValueError(f"tokens_per_chunk must be 0-15 (one digest byte each); got {tokens_per_chunk}")
        self.tokens_per_chunk = tokens_per_chunk
        self.model_info = ModelInfo(
            name="fake:hash", lookahead_ms=lookahead_ms, lookaheads_ms=(lookahead_ms,),
            sample_rate=self.geometry.sample_rate, vocabulary_size=len(PIECES),
            random_weights=True, description="deterministic hash-chain fake engine for tests",
            languages=("en",),
        )
        self._lock = threading.Lock()          # guards slots and counters
        self._step_lock = threading.Lock()     # detects concurrent steps
        self._slots: dict[int, _Slot | None] = {i: None for i in range(capacity)}
        self._executions = 0
        # Test hooks and observations.
        self.gate = threading.Event()          # steps wait on it; set = run freely
        self.gate.set()
        self.fail_next_steps = 0               # that many steps raise EngineError
        self.violations: list[str] = []
        self.step_threads: set[int] = set()
        self.batch_sizes: list[int] = []
        self.steps_started = 0

    # -- slots ---------------------------------------------------------------------------
    def acquire_slot(self) -> int:
        with self._lock:
            for slot, state in self._slots.items():
                if state is None:
                    self._slots[slot] = _Slot()
                    return slot
        raise PoolExhaustedError(f"all {self.capacity} slots are in use")

    def release_slot(self, slot: int) -> None:
        with self._lock:
            if self._slots.get(slot) is None:
                self._violation(f"release of slot {slot} that is not in use")
            self._slots[slot] = None

    def slots_in_use(self) -> int:
        with self._lock:
            return sum(state is not None for state in self._slots.values())

    def executions(self) -> dict[str, int]:
        with self._lock:
            return {self.name: self._executions}

    def _violation(self, message: str) -> None:
        self.violations.append(message)
        raise EngineError(message)

    # -- steps ---------------------------------------------------------------------------
    def step(self, plan: StepPlan) -> StepResult:
        if not self._step_lock.acquire(blocking=False):
            self._violation("step called while another step runs")
        try:
            self.step_threads.add(threading.get_ident())
            self.steps_started += 1
            return self._step(plan)
        finally:
            self._step_lock.release()

    def _step(self, plan: StepPlan) -> StepResult:
        t0 = time.perf_counter()
        if not plan.chunks:
            self._violation("empty plan")
        if len(plan.chunks) > self.max_batch:
            self._violation(f"plan of {len(plan.chunks)} chunks exceeds max_batch {self.max_batch}")
        ids = [c.stream_id for c in plan.chunks]
        slots = [c.slot for c in plan.chunks]
        if len(set(ids)) != len(ids) or len(set(slots)) != len(slots):
            self._violation(f"a stream or slot appears twice in one plan: {ids} {slots}")
        bad = [c.stream_id for c in plan.chunks if self._invalid(c)]
        if bad:
            raise BadChunkError(f"invalid audio in chunks of {bad}", tuple(bad))
        with self._lock:
            states = []
            for c in plan.chunks:
                state = self._slots.get(c.slot)
                if state is None:
                    self._violation(f"slot {c.slot} used by {c.stream_id} is not acquired")
                if not c.first and state.owner != c.stream_id:
                    self._violation(f"slot {c.slot} owned by {state.owner} got a chunk of {c.stream_id}")
                if not c.first and state.finished:
                    self._violation(f"stream {c.stream_id} got a chunk after its final")
                states.append(state)
        self.gate.wait()
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.fail_next_steps > 0:
            self.fail_next_steps -= 1
            raise EngineError("injected step failure")
        updates = tuple(self._advance(c, s) for c, s in zip(plan.chunks, states))
        with self._lock:
            self._executions += 1
        self.batch_sizes.append(len(plan.chunks))
        total_ms = 1000 * (time.perf_counter() - t0)
        return StepResult(updates=updates, engine=self.name,
                          timings=StepTimings(encoder_ms=total_ms, total_ms=total_ms))

    @staticmethod
    def _invalid(c: ChunkWork) -> bool:
        s = c.samples
        if not isinstance(s, np.ndarray) or s.dtype != np.float32 or s.ndim != 1:
            return True
        if s.size == 0 and not c.audio_ended:
            return True
        return not bool(np.isfinite(s).all())

    def _advance(self, c: ChunkWork, state: _Slot) -> StreamUpdate:
        g = self.geometry
        if c.first:
            state.owner, state.digest, state.chunks, state.samples = c.stream_id, b"", 0, 0
            state.finished = state.has_text = False
            state.endpointing, state.in_speech = c.endpointing is not None, False
        if c.new_utterance:
            state.in_speech = False
        k = state.chunks
        digest = hashlib.blake2b(state.digest + struct.pack("<q", k) + c.samples.tobytes(), digest_size=16).digest()
        state.digest, state.chunks = digest, k + 1
        state.samples += c.samples.size
        n_tokens = digest[0] % 3 if self.tokens_per_chunk is None else self.tokens_per_chunk
        tokens = tuple(
            TokenEvent(token_id=digest[1 + i] % len(PIECES), piece=PIECES[digest[1 + i] % len(PIECES)],
                       frame=k * g.encoder_frames + i % g.encoder_frames)
            for i in range(n_tokens)
        )
        text = "".join(t.piece for t in tokens).replace("▁", " ")
        if not state.has_text:
            text = text.lstrip(" ")  # a transcript does not start with a space
        state.has_text = state.has_text or bool(text)
        state.finished = c.audio_ended and state.chunks >= g.total_chunks(state.samples)
        frames = state.chunks * g.encoder_frames
        # Endpointing, as deterministic as the text: a chunk with any non-zero sample is speech
        # (an utterance starts at its first frame), a chunk of exact zeros after speech ends the
        # utterance at its last frame.
        starts: tuple[int, ...] = ()
        ends: tuple[int, ...] = ()
        if state.endpointing and c.samples.size:
            silent = not c.samples.any()
            if not silent and not state.in_speech:
                state.in_speech, starts = True, (k * g.encoder_frames,)
            elif silent and state.in_speech:
                state.in_speech, ends = False, (frames - 1,)
        return StreamUpdate(
            stream_id=c.stream_id, slot=c.slot, tokens=tokens, text_delta=text,
            is_final=state.finished, frames_decoded=frames,
            audio_seconds=min(frames * g.encoder_frame_seconds, state.samples / g.sample_rate),
            starts=starts, ends=ends,
        )

    def warmup(self) -> str:
        before = self.executions().get(self.name, 0)
        slot = self.acquire_slot()
        try:
            silence = np.zeros(self.geometry.samples_needed(0), dtype=np.float32)
            self.step(StepPlan((ChunkWork("warmup", slot, silence, first=True, audio_ended=True),)))
        finally:
            self.release_slot(slot)
        if self.executions().get(self.name, 0) <= before:
            raise EngineError(f"warm-up ran but the {self.name} execution counter did not move")
        return self.name


def build_fake_engine(cfg: EngineConfig) -> FakeEngine:
    """Engine factory with build_engine's signature, for `asr-server --engine-factory`.

    FAKE_ENGINE_STEP_DELAY_S slows each step (a subprocess test wants streams to stay open);
    FAKE_ENGINE_TOKENS_PER_CHUNK fixes the tokens a chunk emits (bench/relay_bench.py).
    """
    tokens = os.environ.get("FAKE_ENGINE_TOKENS_PER_CHUNK")
    return FakeEngine(capacity=cfg.max_streams, max_batch=cfg.max_batch, lookahead_ms=cfg.lookahead_ms,
                      step_delay_s=float(os.environ.get("FAKE_ENGINE_STEP_DELAY_S", "0")),
                      tokens_per_chunk=int(tokens) if tokens else None)
