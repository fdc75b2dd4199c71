"""A stream's utterances, as the scheduler keeps them: the open utterance's tokens and text, and
the closing of an utterance into its final (server.scheduling.stream_events.Utterance).

Only the open utterance is kept, so a stream's memory does not grow with the length of a call.
The engine says where utterances end (StreamUpdate.ends, encoder frames); a client can end one
itself, and the end of the audio ends the last. Pure Python, no torch.

The open utterance's tokens are kept as three columns (ids, pieces, frames), not as TokenEvent
tuples: a tuple subclass stays tracked by the garbage collector, and an utterance that runs long
(endpointing off, or a speaker who never pauses) held one per token. At 2,400 streams of 60 s that
was most of the scheduler process's heap, and each full collection walked it (about a second on
the H200 host, bench/RESULTS.md run 29). Three lists per stream are three tracked objects
whatever their length; the closed utterance keeps the columns too (Utterance).
"""

from __future__ import annotations

from engines.api import TokenEvent, pieces_text
from server.scheduling.stream_events import ChunkResult, Utterance, UtteranceEnd


def token_columns(tokens: tuple[TokenEvent, ...]) -> tuple[list[int], list[str], list[int]]:
    """TokenEvents as the three columns the book keeps (ids, pieces, frames)."""
    if not tokens:
        return [], [], []
    ids, pieces, frames = zip(*tokens)
    return list(ids), list(pieces), list(frames)


class UtteranceBook:
    def __init__(self, frame_seconds: float, word_boundary: str = "\u2581"):
        self.frame_seconds = frame_seconds
        self.word_boundary = word_boundary
        self.index = 0                   # the open utterance's index
        self.finals = 0                  # utterances closed with a final so far
        self._ids: list[int] = []         # the open utterance's tokens, by column
        self._pieces: list[str] = []
        self._frames: list[int] = []
        self._parts: list[str] = []
        self._speech_at: int | None = None  # frame the endpointer heard speech start, if it did

    # -- the open utterance -------------------------------------------------------------------
    @property
    def transcript(self) -> str:
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def open_tokens(self) -> int:
        """How many tokens the open utterance holds."""
        return len(self._ids)

    def add(self, tokens: tuple[TokenEvent, ...], text: str) -> str:
        """Tokens and their text join the open utterance; returns the text as added (an
        utterance's text does not start with a space)."""
        return self.add_columns(*token_columns(tokens), text)

    def add_columns(self, ids: list[int], pieces: list[str], frames: list[int], text: str) -> str:
        """`add` with the tokens as three columns (as a step's result carries them)."""
        if not ids:
            return ""
        if not self._parts or not self.transcript:
            text = text.lstrip(" ")
        self._ids += ids
        self._pieces += pieces
        self._frames += frames
        if text:
            self._parts.append(text)
        return text

    def speech_started(self, frame: int) -> None:
        if self._speech_at is None:
            self._speech_at = frame

    # -- a step with endpoint events ----------------------------------------------------------
    def apply(self, tokens: tuple[TokenEvent, ...], text: str, starts: tuple[int, ...],
              ends: tuple[int, ...]) -> tuple[list[Utterance], str]:
        """One step's tokens, split at the step's utterance ends. Returns the finals this step
        closed (utterances without text are dropped silently: the endpointer heard noise) and
        the text the step added to the open utterance."""
        return self.apply_columns(*token_columns(tokens), text, starts, ends)

    def apply_columns(self, ids: list[int], pieces: list[str], frames: list[int], text: str,
                      starts: tuple[int, ...], ends: tuple[int, ...]) -> tuple[list[Utterance], str]:
        """`apply` with the tokens as three columns: the scheduler hands a step's token columns
        on as slices, with no token object made until an utterance closes."""
        if not ends:
            for frame in starts:
                self.speech_started(frame)
            return [], self.add_columns(ids, pieces, frames, text)
        finals: list[Utterance] = []
        pos = 0
        pending_starts = sorted(starts)
        for end in ends:
            for frame in [f for f in pending_starts if f <= end]:
                self.speech_started(frame)
                pending_starts.remove(frame)
            cut = pos
            while cut < len(frames) and frames[cut] <= end:  # a step's tokens are in frame order
                cut += 1
            self.add_columns(ids[pos:cut], pieces[pos:cut], frames[pos:cut],
                             pieces_text(pieces[pos:cut], self.word_boundary))
            pos = cut
            closed = self.close(UtteranceEnd.ENDPOINT, end_frame=end, keep_empty=False)
            if closed is not None:
                finals.append(closed)
        for frame in pending_starts:
            self.speech_started(frame)
        added = self.add_columns(ids[pos:], pieces[pos:], frames[pos:], pieces_text(pieces[pos:], self.word_boundary))
        return finals, added

    def close(self, closed_by: UtteranceEnd, end_frame: int | None = None, keep_empty: bool = True) -> Utterance | None:
        """Close the open utterance and open the next. An utterance without text gives no final
        unless `keep_empty` (None is returned; the index is not used up)."""
        text, speech_at, ids, pieces, frames = self.transcript, self._speech_at, self._ids, self._pieces, self._frames
        self._ids, self._pieces, self._frames, self._parts, self._speech_at = [], [], [], [], None
        if not text and not keep_empty:
            return None
        fs = self.frame_seconds
        if frames:
            first = frames[0] if speech_at is None else min(speech_at, frames[0])
            start, end = first * fs, (frames[-1] + 1) * fs
        else:
            start = (speech_at if speech_at is not None else (end_frame or 0)) * fs
            end = max(start, (end_frame if end_frame is not None else 0) * fs)
        utterance = Utterance(index=self.index, transcript=text, token_ids=tuple(ids), pieces=tuple(pieces),
                              frames=tuple(frames), start_seconds=start, end_seconds=end, closed_by=closed_by)
        self.index += 1
        self.finals += 1
        return utterance

    def close_at_end_of_audio(self) -> Utterance | None:
        """The end of the audio closes the last utterance. It has a final even without text,
        unless an earlier utterance had one (a stream always ends with at least one final)."""
        return self.close(UtteranceEnd.END_OF_AUDIO, keep_empty=self.finals == 0)


def chunk_event(stream_id: str, book: UtteranceBook, k: int, ready: float, audio_s: float, ids: list[int],
                pieces: list[str], frames: list[int], text: str, starts: tuple[int, ...], ends: tuple[int, ...],
                is_final: bool, final_due: bool) -> ChunkResult:
    """One answered chunk of a stream as its event, the stream's utterance book brought up to it:
    its tokens join the open utterance, split at the endpointer's ends (each closing a final);
    `is_final` (the end of the audio) closes the last utterance, `final_due` (the client asked)
    closes the open one. A chunk with none of these (most chunks) leaves the book as it was.
    The one place a chunk's text is made, whether the scheduler's process or a frontend process
    keeps the book (server.runtime.remote_scheduler). The caller counts the finals' latencies,
    by each Utterance's closed_by."""
    if not (starts or ends or is_final or final_due):  # most chunks: progress, or tokens for the open utterance
        added = book.add_columns(ids, pieces, frames, text) if ids else ""
        return ChunkResult(stream_id, k, book.transcript, added, False, audio_s, ready, book.index)
    finals, added = book.apply_columns(ids, pieces, frames, text, starts, ends)
    if is_final:
        last = book.close_at_end_of_audio()
        if last is not None:
            finals.append(last)
    elif final_due:
        # An utterance without tokens ends where the decoded audio does.
        closed = book.close(UtteranceEnd.CLIENT, end_frame=int(audio_s / book.frame_seconds))
        if closed is not None:
            finals.append(closed)
        added = ""
    transcript = (finals[-1].transcript if finals else "") if is_final else book.transcript
    return ChunkResult(stream_id=stream_id, chunk_index=k, transcript=transcript, new_text=added, is_final=is_final,
                       audio_seconds=audio_s, audio_ready_at=ready, utterance_index=book.index, finals=tuple(finals))


def final_latency(utterance: Utterance, requested_at: float, ready: float, now: float) -> float:
    """How long an utterance's final took: from the client's request for a final it asked for,
    else from the audio that made the chunk that closed it (the endpoint, the end of audio)."""
    return now - (requested_at if utterance.closed_by is UtteranceEnd.CLIENT else ready)
