"""The contract between the scheduler and a streaming engine: typed plans in, typed results out.

Pure Python (numpy only, no torch): the scheduler and the server import these types without
loading any model runtime.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from engines.geometry import ChunkGeometry


class EngineError(RuntimeError):
    """A step could not run; no stream's state was changed."""


class BadChunkError(EngineError):
    """One chunk of a plan is invalid (empty, wrong dtype, not finite, unknown stream).

    Raised before any state is touched; `stream_ids` names the offending streams so the
    caller can fail those alone and retry the rest.
    """

    def __init__(self, message: str, stream_ids: tuple[str, ...]):
        super().__init__(message)
        self.stream_ids = stream_ids


class PoolExhaustedError(EngineError):
    """Every cache slot is taken: the admission limit."""


class EngineOverloadedError(EngineError):
    """The step ran out of device memory at this batch size (torch.cuda.OutOfMemoryError inside
    the engine); no stream's state was changed. The same chunks may succeed in smaller batches:
    the scheduler splits the batch and lowers its maximum batch size."""

    def __init__(self, message: str, batch_size: int):
        super().__init__(message)
        self.batch_size = batch_size


class StreamStateLostError(EngineError):
    """The step failed while committing state back to the slots: the named streams' state is
    undefined, so they cannot continue (their chunks must not be retried)."""

    def __init__(self, message: str, stream_ids: tuple[str, ...]):
        super().__init__(message)
        self.stream_ids = stream_ids


@dataclass(frozen=True)
class EndpointingParams:
    """One stream's endpointing, in the semantics of Riva's EndpointingConfig, resolved (every
    value set). The engine decides per encoder frame from the model's own output: a frame's
    non-blank probability is 1 - P(blank) at the frame's first joint evaluation.

    - An utterance starts when, over the last `start_history_ms`, the mean non-blank probability
      reaches `start_threshold`.
    - An open utterance ends when, over the last `stop_history_ms`, the mean blank probability
      reaches `stop_threshold`.
    - For models with an end-of-utterance token: once the model has emitted it, the utterance
      ends when, over the last `stop_history_eou_ms` after it, the mean blank probability
      reaches `stop_threshold_eou` (a history of 0 ends it at the token's frame).
    A history of 0 turns its rule off (start: every frame counts as speech).
    """

    start_history_ms: int = 240
    start_threshold: float = 0.2
    stop_history_ms: int = 800
    stop_threshold: float = 0.98
    stop_history_eou_ms: int = 0
    stop_threshold_eou: float = 0.98

    def __post_init__(self) -> None:
        for name in ("start_history_ms", "stop_history_ms", "stop_history_eou_ms"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_ENDPOINT_HISTORY_MS:
                raise ValueError(f"{name} {value} is outside 0..{MAX_ENDPOINT_HISTORY_MS} ms")
        for name in ("start_threshold", "stop_threshold", "stop_threshold_eou"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} {value} is outside 0.0..1.0")


# The longest endpointing window a stream may ask for: the engine keeps this much history of
# per-frame probabilities per slot (64 frames at the usual 80 ms encoder frame).
MAX_ENDPOINT_HISTORY_MS = 5000


@dataclass(frozen=True)
class ChunkWork:
    """One stream's share of a step.

    `samples` are the stream's new mono float32 samples at the model's sample rate, exactly
    the span ChunkGeometry.chunk_span gives for this chunk. `first` marks the stream's first
    chunk (its slot is reset before use); `audio_ended` says no audio follows these samples.
    `endpointing` (read on the first chunk; None: off) says how the engine splits the stream
    into utterances; `new_utterance` says the client ended the previous utterance itself, so
    the endpointer starts this chunk afresh (no speech heard, empty history).
    """

    stream_id: str
    slot: int
    samples: np.ndarray
    first: bool
    audio_ended: bool
    endpointing: EndpointingParams | None = None
    new_utterance: bool = False


class RowSamples:
    """A step's audio as one flat float32 array with per-row offsets: row i's samples are
    flat[offsets[i]:offsets[i + 1]]. A sequence of the rows' arrays (each a view, made when
    asked for), so code that reads samples row by row reads it as a list; an engine that knows
    it reads `lengths` and `stack` without a view per row (server.runtime.engine_worker's plans, whose
    audio arrives this way in shared memory)."""

    __slots__ = ("flat", "offsets")

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat = flat
        self.offsets = np.asarray(offsets, dtype=np.int64)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.flat[int(self.offsets[i]):int(self.offsets[i + 1])]

    def __iter__(self):
        bounds = self.offsets.tolist()
        flat = self.flat
        return (flat[a:b] for a, b in zip(bounds, bounds[1:]))

    def stack(self, rows: np.ndarray, width: int) -> np.ndarray:
        """The named rows, each exactly `width` samples long, as one [rows, width] array."""
        starts = self.offsets[rows]
        if len(starts) and np.all(np.diff(starts) == width):  # consecutive rows: one slice
            return self.flat[int(starts[0]):int(starts[0]) + width * len(starts)].reshape(len(starts), width)
        return self.flat[starts[:, None] + np.arange(width)]

    def stack_into(self, out: np.ndarray, rows: np.ndarray | None = None) -> None:
        """The named rows (None: all), each exactly out.shape[1] samples long, written into `out`
        ([rows, width], a view such as the new-audio columns of a batch's windows)."""
        out[...] = self.stack(np.arange(len(self)) if rows is None else rows, out.shape[1])

    @property
    def typed(self) -> bool:
        """Whether the samples are 1-D float32 (what an engine takes)."""
        flat = self.flat
        return isinstance(flat, np.ndarray) and flat.dtype == np.float32 and flat.ndim == 1


class StepPlan:
    """One step's rows. Built from ChunkWork rows (`StepPlan(chunks)`), or column by column
    (`StepPlan.from_columns`: the scheduler builds its rows as arrays, and an engine reads them
    as arrays; the samples as a list of arrays, or as RowSamples). Either form offers both
    views, each made on first use: `chunks` (a ChunkWork per row) and the columns `stream_ids`,
    `slots`, `samples`, `first`, `audio_ended`, `new_utterance`, `endpointing` (row -> params,
    the rows that carry them). Never mutated."""

    __slots__ = ("_chunks", "_columns")

    def __init__(self, chunks: tuple[ChunkWork, ...] | list[ChunkWork] = ()):
        self._chunks = tuple(chunks)
        self._columns: tuple | None = None

    @classmethod
    def from_columns(cls, stream_ids: list[str], slots: np.ndarray, samples: list[np.ndarray] | RowSamples,
                     first: np.ndarray,
                     audio_ended: np.ndarray, new_utterance: np.ndarray,
                     endpointing: dict[int, EndpointingParams] | None = None) -> StepPlan:
        n = len(stream_ids)
        if not (len(slots) == len(samples) == len(first) == len(audio_ended) == len(new_utterance) == n):
            raise ValueError("a plan's columns must have one entry per row")
        plan = cls.__new__(cls)
        plan._chunks = None
        plan._columns = (list(stream_ids), np.asarray(slots, dtype=np.int64),
                         samples if isinstance(samples, RowSamples) else list(samples),
                         np.asarray(first, dtype=bool), np.asarray(audio_ended, dtype=bool),
                         np.asarray(new_utterance, dtype=bool), dict(endpointing or {}))
        return plan

    @property
    def chunks(self) -> tuple[ChunkWork, ...]:
        if self._chunks is None:
            ids, slots, samples, first, ended, new, endpointing = self._columns
            self._chunks = tuple(
                ChunkWork(sid, slot, s, f, e, endpointing.get(i), u)
                for i, (sid, slot, s, f, e, u) in enumerate(zip(ids, slots.tolist(), samples, first.tolist(),
                                                                ended.tolist(), new.tolist())))
        return self._chunks

    def _cols(self) -> tuple:
        if self._columns is None:
            c = self._chunks
            for w in c:
                if not isinstance(w, ChunkWork):
                    raise EngineError(f"plan entries must be ChunkWork, got {type(w).__name__}")
            self._columns = ([w.stream_id for w in c], np.fromiter((w.slot for w in c), np.int64, len(c)),
                             [w.samples for w in c], np.fromiter((w.first for w in c), bool, len(c)),
                             np.fromiter((w.audio_ended for w in c), bool, len(c)),
                             np.fromiter((w.new_utterance for w in c), bool, len(c)),
                             {i: w.endpointing for i, w in enumerate(c) if w.endpointing is not None})
        return self._columns

    stream_ids = property(lambda self: self._cols()[0])
    slots = property(lambda self: self._cols()[1])
    samples = property(lambda self: self._cols()[2])
    first = property(lambda self: self._cols()[3])
    audio_ended = property(lambda self: self._cols()[4])
    new_utterance = property(lambda self: self._cols()[5])
    endpointing = property(lambda self: self._cols()[6])

    def __len__(self) -> int:
        return len(self._chunks) if self._chunks is not None else len(self._columns[0])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StepPlan) and self.chunks == other.chunks

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"StepPlan({len(self)} rows: {self.stream_ids!r})"


class TokenEvent(NamedTuple):
    # A named tuple, not a dataclass: a step builds one per emitted token on the engine thread,
    # under the interpreter lock the event loop also needs, and a tuple builds in half the time.
    token_id: int
    piece: str
    frame: int  # encoder frame index within the stream, for word times


@dataclass(frozen=True)
class StreamUpdate:
    stream_id: str
    slot: int
    tokens: tuple[TokenEvent, ...]  # new tokens of this step, in order
    text_delta: str                  # text those tokens add to the transcript
    is_final: bool                   # the stream's audio is fully decoded
    frames_decoded: int              # encoder frames decoded so far in this stream
    audio_seconds: float             # audio covered by the decoded frames
    # Endpointing (streams that have it): the stream's encoder frames at which speech started
    # and at which an utterance ended in this step, in order. Tokens at frames up to an end
    # belong to the utterance it closes.
    starts: tuple[int, ...] = ()
    ends: tuple[int, ...] = ()


# A step's phases that do not overlap, in the order they run (StepTimings.phases)
STEP_PHASES = ("assemble", "features", "gather", "encoder", "decode", "commit", "results")


@dataclass(frozen=True)
class StepTimings:
    features_ms: float = 0.0   # host windows + STFT/mel + slot gather (assemble_ms and gather_ms included)
    encoder_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    # Host-side parts, for bench/host_overhead.py: per-row Python work that grows with the batch.
    assemble_ms: float = 0.0   # validation and the batch's waveform windows (numpy, host)
    gather_ms: float = 0.0     # the slot pool's gather of the batch's state rows
    commit_ms: float = 0.0     # scatter to the slot pool, waveform history, host counters
    results_ms: float = 0.0    # the per-row StreamUpdate objects
    # True when the step synchronized the device at each phase boundary (a sampled step, see
    # EngineConfig.profile_every): only then do a GPU's phases hold its time; otherwise a phase
    # holds its launches and the next sync pays for it. (On the CPU every step's phases are
    # true, but only sampled steps say so, the same share of steps on every device.)
    synced: bool = False
    # True when the step's preparation (validation, windows: assemble_ms) ran while the step
    # before it was on the device (StreamingEngine.prepare, the engine worker's read-ahead)
    prepared_ahead: bool = False
    # The way to an engine in another process and back (server.runtime.engine_worker), in ms; zero for
    # an engine in the scheduler's process. Clock readings of both processes (CLOCK_MONOTONIC):
    to_worker_ms: float = 0.0      # packing and sending, until the worker takes the request up (with
                                   # two steps in flight, this includes waiting behind the one before)
    worker_before_ms: float = 0.0  # the worker, from the request to the engine's step
    worker_after_ms: float = 0.0   # the worker, from the engine's result to its reply sent
    from_worker_ms: float = 0.0    # the reply sent, until the scheduler's thread has it (and the lock)
    unpack_ms: float = 0.0         # the scheduler's thread rebuilds the result

    def phases(self) -> dict[str, float]:
        """The step's seven phases, each on its own (STEP_PHASES, in order): `features` is the
        STFT/mel alone, without the assemble and gather that `features_ms` includes, so the
        phases add up to the step (give or take the clock between them)."""
        return dict(zip(STEP_PHASES, (self.assemble_ms, self.features_ms - self.assemble_ms - self.gather_ms,
                                      self.gather_ms, self.encoder_ms, self.decode_ms, self.commit_ms,
                                      self.results_ms), strict=True))



# The stages of a step run in parts (StreamingEngine.start_step, a StepRun): its device work
# up to the encoder is queued, with copies of what the rest of the step reads (the next step's
# device work may be queued from here on where the engine's `next_at` says so); its decode has
# run and its commit is queued (the next step's device work may be queued from here on).
QUEUED = "queued"
DEVICE_DONE = "device_done"


class StepResult:
    """One step's rows, in the plan's order. Built from StreamUpdate rows (`StepResult(updates,
    engine, timings)`), or column by column (`StepResult.from_columns`: token ids with per-row
    offsets, so rows without tokens cost no object). Either form offers both views, each made
    on first use: `updates` (a StreamUpdate per row) and the columns (`stream_ids`, `slots`,
    `is_final`, `frames_decoded`, `audio_seconds`, `text_delta`, `token_offsets` [rows + 1],
    `token_ids`, `token_pieces`, `token_frames`, and `starts`/`ends`: row -> frames, the rows
    that have any). Never mutated (server.runtime.engine_worker renumbers slots in `updates`)."""

    __slots__ = ("engine", "timings", "_updates", "_columns")

    def __init__(self, updates: tuple[StreamUpdate, ...] | list[StreamUpdate] = (), engine: str = "",
                 timings: StepTimings | None = None):
        self._updates = tuple(updates)
        self._columns: ResultColumns | None = None
        self.engine = engine  # name of the encoder engine that executed this step
        self.timings = timings if timings is not None else StepTimings()

    @classmethod
    def from_columns(cls, columns: ResultColumns, engine: str, timings: StepTimings | None = None) -> StepResult:
        result = cls((), engine, timings)
        result._updates = None
        result._columns = columns
        return result

    def __len__(self) -> int:
        return len(self._updates) if self._updates is not None else len(self._columns.stream_ids)

    @property
    def updates(self) -> tuple[StreamUpdate, ...]:
        if self._updates is None:
            c = self._columns
            tokens = c.tokens_by_row()
            self._updates = tuple(
                StreamUpdate(stream_id=sid, slot=slot, tokens=tokens.get(i, ()), text_delta=text, is_final=fin,
                             frames_decoded=frames, audio_seconds=seconds, starts=c.starts.get(i, ()),
                             ends=c.ends.get(i, ()))
                for i, (sid, slot, text, fin, frames, seconds) in enumerate(zip(
                    c.stream_ids, c.slots.tolist(), c.text_delta, c.is_final.tolist(), c.frames_decoded.tolist(),
                    c.audio_seconds.tolist())))
        return self._updates

    @property
    def columnar(self) -> bool:
        """Built from columns, or its columns were asked for already (reading them is free)."""
        return self._columns is not None

    @property
    def columns(self) -> ResultColumns:
        if self._columns is None:
            self._columns = ResultColumns.of_updates(self._updates)
        return self._columns

    def __repr__(self) -> str:
        return f"StepResult({len(self)} rows, engine={self.engine!r})"


@dataclass(frozen=True, eq=False)
class ResultColumns:
    """A step's results as columns (see StepResult). Tokens of row i are
    token_ids[token_offsets[i]:token_offsets[i + 1]] (and the same slice of pieces and frames)."""

    stream_ids: list[str]
    slots: np.ndarray           # int64 [rows]
    is_final: np.ndarray        # bool [rows]
    frames_decoded: np.ndarray  # int64 [rows]
    audio_seconds: np.ndarray   # float64 [rows]
    text_delta: list[str]       # per row ("" for most)
    token_offsets: np.ndarray   # int64 [rows + 1]
    token_ids: np.ndarray       # int64 [tokens]
    token_pieces: list[str]     # [tokens]
    token_frames: np.ndarray    # int64 [tokens]
    starts: dict[int, tuple[int, ...]] = field(default_factory=dict)
    ends: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def tokens_of(self, row: int) -> tuple[TokenEvent, ...]:
        a, b = int(self.token_offsets[row]), int(self.token_offsets[row + 1])
        if a == b:
            return ()
        return tuple(map(TokenEvent, self.token_ids[a:b].tolist(), self.token_pieces[a:b],
                         self.token_frames[a:b].tolist()))

    def tokens_by_row(self) -> dict[int, tuple[TokenEvent, ...]]:
        """The token objects of the rows that have tokens, in one pass over the columns."""
        offsets = self.token_offsets.tolist()
        ids, pieces, frames = self.token_ids.tolist(), self.token_pieces, self.token_frames.tolist()
        return {i: tuple(map(TokenEvent, ids[offsets[i]:offsets[i + 1]], pieces[offsets[i]:offsets[i + 1]],
                             frames[offsets[i]:offsets[i + 1]]))
                for i in np.flatnonzero(np.diff(self.token_offsets)).tolist()}

    @classmethod
    def of_updates(cls, updates: tuple[StreamUpdate, ...]) -> ResultColumns:
        n = len(updates)
        counts = np.fromiter((len(u.tokens) for u in updates), np.int64, n)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        tokens = [t for u in updates for t in u.tokens]
        return cls(stream_ids=[u.stream_id for u in updates],
                   slots=np.fromiter((u.slot for u in updates), np.int64, n),
                   is_final=np.fromiter((u.is_final for u in updates), bool, n),
                   frames_decoded=np.fromiter((u.frames_decoded for u in updates), np.int64, n),
                   audio_seconds=np.fromiter((u.audio_seconds for u in updates), np.float64, n),
                   text_delta=[u.text_delta for u in updates], token_offsets=offsets,
                   token_ids=np.fromiter((t.token_id for t in tokens), np.int64, len(tokens)),
                   token_pieces=[t.piece for t in tokens],
                   token_frames=np.fromiter((t.frame for t in tokens), np.int64, len(tokens)),
                   starts={i: u.starts for i, u in enumerate(updates) if u.starts},
                   ends={i: u.ends for i, u in enumerate(updates) if u.ends})


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DEAD = "dead"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    lookahead_ms: int
    lookaheads_ms: tuple[int, ...]
    sample_rate: int
    vocabulary_size: int
    random_weights: bool
    description: str
    languages: tuple[str, ...] = ()
    word_boundary: str = "\u2581"   # piece prefix that starts a word ("" for character models)
    eou_token: str = ""              # the model's end-of-utterance piece, if it has one


def tokens_text(tokens, word_boundary: str, eou_token: str = "") -> str:
    """The text a run of tokens adds (word-start markers as spaces; the end-of-utterance
    token, a signal and not a word, left out)."""
    return pieces_text([t.piece for t in tokens if not eou_token or t.piece != eou_token], word_boundary)


def pieces_text(pieces: list[str], word_boundary: str) -> str:
    """The text a run of pieces adds (word-start markers as spaces)."""
    text = "".join(pieces)
    return text.replace(word_boundary, " ") if word_boundary else text


class StreamingEngine(Protocol):
    """What the scheduler needs from an engine. Implementations: engines.streaming_engine
    (real models) and the scheduler tests' fake engine."""

    geometry: ChunkGeometry
    model_info: ModelInfo
    capacity: int       # cache slots: the most streams open at once
    max_batch: int      # the most chunks one step takes

    # Thread-safe. A slot is released by the scheduler once its stream has left and is in no
    # step in flight; the engine resets a slot's state when a chunk marked `first` uses it.
    def acquire_slot(self) -> int: ...
    def release_slot(self, slot: int) -> None: ...
    def slots_in_use(self) -> int: ...
    # Raises BadChunkError (named chunks invalid), EngineOverloadedError (out of device memory at
    # this batch size), StreamStateLostError (failure while committing), or another EngineError;
    # in every case but StreamStateLostError no stream's state was changed.
    def step(self, plan: StepPlan) -> StepResult: ...
    # Encoder executions by engine name ("eager", "onnx", ...): what really ran.
    def executions(self) -> dict[str, int]: ...
    # One step on silence through a temporary slot; raises EngineError unless the configured
    # encoder engine's execution counter moved. Returns the engine name that executed.
    def warmup(self) -> str: ...
