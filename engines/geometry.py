"""Chunk geometry of a cache-aware streaming model: which audio samples each step consumes.

Pure Python (no torch), so the scheduler can decide when a stream has a ready chunk without
importing the engine's heavy dependencies.

Conventions (NeMo's "pad and drop", every step has one shape):
- Features are log-mel frames with hop `hop` samples. Frame i is computed from the samples
  [i*hop - stft_left_pad, i*hop - stft_left_pad + n_fft) of the stream, zero outside [0, len).
  A stream of n samples has n_frames(n) frames, NeMo's preprocessor's seq_len over the whole
  file.
- Step k (0-based) encodes the new mel frames [k*C, (k+1)*C), C = `chunk_frames`, preceded by
  `pre_encode_frames` cached frames (zeros for k = 0).
- The last frame of chunk k reaches `right_context` samples past the chunk's boundary. With
  `lead_in` = 0 (NeMo's framing of the raw audio), chunk k can run once
  (k+1)*C*hop + right_context samples have arrived: a client sending one chunk of audio per
  message would wait for the next message before its chunk runs. With `lead_in` =
  right_context (the default of real engines), every stream is framed as if it began with
  lead_in samples of silence, so chunk k is complete exactly at (k+1)*C*hop samples, at the end
  of the client's chunk; the cost is that the model hears the audio 6 ms later (at 16 kHz with
  NeMo's 512-point STFT), a shift well inside one 10 ms frame.
- Once the audio has ended, at most one (shorter) chunk remains, and possibly none.

All sample counts in the public methods are of the stream's own audio (without the lead-in).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class ChunkGeometry:
    sample_rate: int
    hop: int                 # samples per mel frame
    n_fft: int
    stft_left_pad: int       # zero samples the STFT adds on the left (n_fft // 2 when centred)
    chunk_frames: int        # C: new mel frames per step
    pre_encode_frames: int   # cached mel frames prepended to every step's input
    encoder_frames: int      # encoder output frames per full step
    subsampling: int         # mel frames per encoder frame
    lookahead_ms: int        # algorithmic right context of the model, as NeMo names the setting
    lead_in: int = 0         # silent samples the framing puts before each stream (see above)

    def __post_init__(self) -> None:
        for name in ("sample_rate", "hop", "n_fft", "chunk_frames", "subsampling"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ChunkGeometry.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.stft_left_pad <= self.n_fft:
            raise ValueError(f"stft_left_pad {self.stft_left_pad} outside [0, n_fft={self.n_fft}]")
        if not 0 <= self.lead_in <= max(self.right_context, 0):
            raise ValueError(f"lead_in {self.lead_in} outside [0, right_context={self.right_context}]")

    # -- sample bookkeeping ------------------------------------------------------------------
    @cached_property  # derived constants, read for every chunk on the event loop
    def chunk_samples(self) -> int:
        """New samples per steady-state step."""
        return self.chunk_frames * self.hop

    @cached_property
    def right_context(self) -> int:
        """Samples past a chunk's boundary that its last frame reads (may be <= 0)."""
        return self.n_fft - self.stft_left_pad - self.hop

    @cached_property
    def wait_samples(self) -> int:
        """Samples past a chunk's boundary (in the stream's own audio) before it can run."""
        return max(self.right_context, 0) - self.lead_in

    @cached_property
    def history_samples(self) -> int:
        """Samples before a chunk's first frame that its STFT reads (plus one for pre-emphasis)."""
        return self.stft_left_pad + 1

    @cached_property
    def segment_samples(self) -> int:
        """Length of the waveform window one step's STFT runs over."""
        return self.stft_left_pad + self.chunk_samples + max(self.right_context, 0)

    @property
    def chunk_ms(self) -> float:
        return 1000.0 * self.chunk_samples / self.sample_rate

    @property
    def encoder_frame_seconds(self) -> float:
        return self.subsampling * self.hop / self.sample_rate

    def stft_frames(self, n_framed: int) -> int:
        """Valid mel frames of n_framed samples (lead-in included): NeMo's preprocessor's
        seq_len (its STFT computes one more frame, which it masks as padding)."""
        return max((n_framed + 2 * self.stft_left_pad - self.n_fft) // self.hop, 0)

    def stft_frames_many(self, n_framed):
        """stft_frames over a numpy integer array (a batch's streams at once); the same formula,
        kept beside the scalar one so the two cannot drift apart."""
        return ((n_framed + 2 * self.stft_left_pad - self.n_fft) // self.hop).clip(min=0)

    def n_frames(self, n_samples: int) -> int:
        """Valid mel frames of a stream of n_samples samples of audio."""
        return self.stft_frames(n_samples + self.lead_in) if n_samples > 0 else 0

    def samples_needed(self, chunk_index: int) -> int:
        """Samples a stream must have received before chunk `chunk_index` can run mid-stream.
        Plain arithmetic: a numpy array of chunk indices gives the array of needs (the slot books)."""
        return (chunk_index + 1) * self.chunk_samples + self.wait_samples

    def chunks_complete(self, received):
        """How many chunks `received` samples complete mid-stream: the inverse of samples_needed
        (an int for an int, an array for an array: the slot books)."""
        n = (received - self.wait_samples) // self.chunk_samples
        return max(0, n) if isinstance(n, int) else n.clip(min=0)

    def consumed_after(self, chunk_index: int) -> int:
        """Samples handed to the engine once chunks 0..chunk_index have run (mid-stream)."""
        return self.samples_needed(chunk_index)

    def total_chunks(self, n_samples: int) -> int:
        """Steps a stream of n_samples needs in all, once its audio has ended."""
        return -(-self.n_frames(n_samples) // self.chunk_frames)

    def finished(self, chunks_done: int, received: int, ended: bool) -> bool:
        """Every frame of an ended stream has been decoded. This can become true without a
        final engine step (a stream that ends exactly on a chunk boundary, or holds less than
        one frame of audio): the scheduler then finalizes the stream itself."""
        return ended and chunks_done >= self.total_chunks(received)

    def chunk_span(self, chunk_index: int, received: int, ended: bool) -> tuple[int, int] | None:
        """The [start, end) sample range to hand to the engine for chunk `chunk_index`.

        Returns None when the chunk is not ready yet. Mid-stream the range ends at
        samples_needed(chunk_index); after the end of audio it ends at `received`.
        """
        start = 0 if chunk_index == 0 else self.consumed_after(chunk_index - 1)
        need = self.samples_needed(chunk_index)
        if received >= need:
            return start, need
        if ended and chunk_index < self.total_chunks(received):
            return min(start, received), received
        return None
