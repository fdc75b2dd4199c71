"""A step's answered chunks as columns (RowColumns): the vocabulary the scheduler hands to a
listener that makes the events itself (server.scheduling.stream_events.ChunkRows) and that the
wire carries to a frontend (server.runtime.wire.Rows) as it is.

A leaf: it imports no other part of the server, so the wire, a helper at the bottom of the
runtime, can carry it (pyproject.toml, the import contracts).
"""

from __future__ import annotations

import msgspec


class RowColumns(msgspec.Struct, array_like=True, gc=False):
    """Answered chunks of several streams as columns: what a frontend needs to make each
    stream's event (server.scheduling.utterances.chunk_event) with no object per row on the way.
    Row i's tokens are ids/pieces/frames[tok_end[i-1]:tok_end[i]] (from 0 for row 0);
    `final_due`: the client's final is due after this chunk; `starts`/`ends`: the endpointer's
    events (encoder frames) of the rows that had any; `consumed`: samples of the stream the
    engine has taken, this chunk included. The same struct travels on the wire
    (server.runtime.wire.Rows), where its check makes a malformed message an error. Untracked by
    the garbage collector, as the wire's messages are: it holds no reference cycle."""

    consumed: list[int]
    chunk: list[int]
    audio_seconds: list[float]
    ready_at: list[float]
    is_final: list[bool]
    final_due: list[bool]
    tok_end: list[int]
    ids: list[int]
    pieces: list[str]
    frames: list[int]
    text: list[str]
    starts: dict[int, tuple[int, ...]]
    ends: dict[int, tuple[int, ...]]

    def __post_init__(self) -> None:
        # Columns that disagree would pair one stream's row with another's values, or leave rows
        # out without a word (zip stops at the shortest).
        n = len(self.chunk)
        if not (len(self.consumed) == len(self.audio_seconds) == len(self.ready_at) == len(self.is_final)
                == len(self.final_due) == len(self.tok_end) == len(self.text) == n):
            raise ValueError(f"row columns of different lengths for {n} rows")
        if not (len(self.ids) == len(self.pieces) == len(self.frames) == (self.tok_end[-1] if n else 0)):
            raise ValueError("the token columns do not end where the last row's tokens do")
        if any(not 0 <= i < n for i in self.starts) or any(not 0 <= i < n for i in self.ends):
            raise ValueError("an endpoint event names a row that is not there")

    def __len__(self) -> int:
        return len(self.chunk)

    def take(self, positions: list[int]) -> RowColumns:
        """These rows, in this order (a frontend's share of a step, or a step's rows without
        those of streams that ended while it ran)."""
        def pick(column: list) -> list:
            return [column[p] for p in positions]

        ends, ids, pieces, frames = self.tok_end, self.ids, self.pieces, self.frames
        tok_end: list[int] = []
        out_ids: list[int] = []
        out_pieces: list[str] = []
        out_frames: list[int] = []
        for p in positions:
            b = ends[p]
            a = ends[p - 1] if p else 0
            if b > a:
                out_ids += ids[a:b]
                out_pieces += pieces[a:b]
                out_frames += frames[a:b]
            tok_end.append(len(out_ids))
        starts: dict[int, tuple[int, ...]] = {}
        stops: dict[int, tuple[int, ...]] = {}
        if self.starts or self.ends:
            for i, p in enumerate(positions):
                if p in self.starts:
                    starts[i] = self.starts[p]
                if p in self.ends:
                    stops[i] = self.ends[p]
        return RowColumns(pick(self.consumed), pick(self.chunk), pick(self.audio_seconds), pick(self.ready_at),
                          pick(self.is_final), pick(self.final_due), tok_end, out_ids, out_pieces, out_frames,
                          pick(self.text), starts, stops)
