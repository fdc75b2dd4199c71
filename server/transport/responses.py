"""Scheduler results -> protobuf responses, with word and token times on finals."""

from __future__ import annotations

from dataclasses import dataclass

from proto import asr_stream_pb2 as pb
from server.scheduling.stream_events import ChunkResult, Utterance

WORD_MARK = "\u2581"  # SentencePiece's word-start marker


@dataclass(frozen=True)
class Word:
    word: str
    start_seconds: float
    end_seconds: float


def word_times(pieces: tuple[str, ...], frames: tuple[int, ...], frame_seconds: float):
    """(text, start seconds, end seconds) of each word of a token sequence given as columns: a
    piece that starts with the word marker (or a space) starts a word once the current one holds
    more than spaces; a word spans from its first token's encoder frame to the end of its last
    token's. One pass, parts joined once per word: a final of a long utterance holds thousands of
    tokens, and every final is built on a frontend's event loop."""
    parts: list[str] = []
    first = last = None
    has_text = False
    for piece, frame in zip(pieces, frames):
        piece = piece.replace(WORD_MARK, " ")
        if has_text and piece[:1] == " ":
            yield "".join(parts).strip(), first * frame_seconds, (last + 1) * frame_seconds
            parts, first, has_text = [], None, False
        if first is None:
            first = frame
        parts.append(piece)
        last = frame
        if not has_text and piece.strip():
            has_text = True
    if has_text:
        yield "".join(parts).strip(), first * frame_seconds, (last + 1) * frame_seconds


def utterance_words(utterance: Utterance, frame_seconds: float) -> list[Word]:
    """An utterance's words with their times (word_times)."""
    return [Word(*w) for w in word_times(utterance.pieces, utterance.frames, frame_seconds)]


def final_result(utterance: Utterance, frame_seconds: float) -> pb.RecognitionResult:
    return fill_final(pb.RecognitionResult(), utterance, frame_seconds)


def fill_final(result: pb.RecognitionResult, utterance: Utterance, frame_seconds: float) -> pb.RecognitionResult:
    """Write the utterance's final into `result` (a new message, or one a response's `results.add()`
    made: extending a response with a built final would copy every element once more)."""
    result.transcript, result.is_final, result.stability = utterance.transcript, True, 1.0
    result.utterance_index, result.end_reason = utterance.index, utterance.closed_by.value
    result.start_seconds, result.end_seconds = utterance.start_seconds, utterance.end_seconds
    # `add` with keywords builds each element in place: half the time of constructing the
    # messages and extending with them (bench/RESULTS.md, runs 52-54: finals at a level's end).
    add = result.words.add
    for text, start, end in word_times(utterance.pieces, utterance.frames, frame_seconds):
        add(word=text, start_seconds=start, end_seconds=end)
    add = result.tokens.add
    for token_id, piece, frame in zip(utterance.token_ids, utterance.pieces, utterance.frames):
        add(token_id=token_id, piece=piece, start_seconds=frame * frame_seconds)
    return result


def interim_result(event: ChunkResult) -> pb.RecognitionResult:
    """The open utterance so far (stability 1.0: greedy decoding never revises emitted text;
    the last word may still grow)."""
    return pb.RecognitionResult(transcript=event.transcript, is_final=False, stability=1.0,
                                utterance_index=event.utterance_index)


def streaming_response(event: ChunkResult, interim_results: bool, frame_seconds: float) -> pb.StreamingRecognizeResponse:
    response = pb.StreamingRecognizeResponse(chunk_index=event.chunk_index, audio_processed=event.audio_seconds,
                                             stream_id=event.stream_id)
    for u in event.finals:
        fill_final(response.results.add(), u, frame_seconds)
    if interim_results and not event.is_final:
        response.results.append(interim_result(event))
    return response


def whole_file_result(finals: list[Utterance], frame_seconds: float) -> pb.RecognitionResult:
    """Recognize's one result: the utterances joined (one utterance without endpointing)."""
    if not finals:
        return pb.RecognitionResult(is_final=True, stability=1.0)
    if len(finals) == 1:
        return final_result(finals[0], frame_seconds)
    texts = [u.transcript for u in finals if u.transcript]
    joined = Utterance(index=0, transcript=" ".join(texts), token_ids=tuple(i for u in finals for i in u.token_ids),
                       pieces=tuple(p for u in finals for p in u.pieces), frames=tuple(f for u in finals for f in u.frames),
                       start_seconds=finals[0].start_seconds, end_seconds=finals[-1].end_seconds,
                       closed_by=finals[-1].closed_by)
    return final_result(joined, frame_seconds)
