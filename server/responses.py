"""Scheduler results -> protobuf responses, with word and token times on finals."""

from __future__ import annotations

from dataclasses import dataclass

from engines.api import TokenEvent
from proto import asr_stream_pb2 as pb
from server.stream_events import ChunkResult

WORD_MARK = "\u2581"  # SentencePiece's word-start marker


@dataclass(frozen=True)
class Word:
    word: str
    start_seconds: float
    end_seconds: float


def words_from_tokens(tokens: tuple[TokenEvent, ...], frame_seconds: float) -> list[Word]:
    """Group tokens into words: a piece that starts with the word marker (or a space) starts a
    word. A word spans from its first token's encoder frame to the end of its last token's."""
    words: list[Word] = []
    text, first, last = "", None, None
    for tok in tokens:
        piece = tok.piece.replace(WORD_MARK, " ")
        if piece.startswith(" ") and text.strip():
            words.append(Word(text.strip(), first * frame_seconds, (last + 1) * frame_seconds))
            text, first = "", None
        if first is None:
            first = tok.frame
        text, last = text + piece, tok.frame
    if text.strip():
        words.append(Word(text.strip(), first * frame_seconds, (last + 1) * frame_seconds))
    return words


def recognition_result(event: ChunkResult, frame_seconds: float) -> pb.RecognitionResult:
    result = pb.RecognitionResult(transcript=event.transcript, is_final=event.is_final, stability=1.0)
    if event.is_final:
        result.words.extend(pb.WordTime(word=w.word, start_seconds=w.start_seconds, end_seconds=w.end_seconds)
                            for w in words_from_tokens(event.tokens, frame_seconds))
        result.tokens.extend(pb.TokenTime(token_id=t.token_id, piece=t.piece, start_seconds=t.frame * frame_seconds)
                             for t in event.tokens)
    return result


def streaming_response(event: ChunkResult, interim_results: bool, frame_seconds: float) -> pb.StreamingRecognizeResponse:
    response = pb.StreamingRecognizeResponse(chunk_index=event.chunk_index, audio_processed=event.audio_seconds,
                                             stream_id=event.stream_id)
    if event.is_final or interim_results:
        response.results.append(recognition_result(event, frame_seconds))
    return response
