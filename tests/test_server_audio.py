"""Audio decoding (WAV sniffing, split samples, encodings, resampling) and word times."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.api import TokenEvent
from server.scheduling.stream_events import Utterance, UtteranceEnd
from server.transport.audio_decoder import AudioDecoder, AudioSpec
from server.transport.responses import utterance_words
from server.transport.wav_header import AudioError, SampleEncoding
from tests.server_harness import RATE, as_float, pcm16_audio, wav_bytes


def decode(decoder: AudioDecoder, pieces) -> np.ndarray:
    out = [decoder.feed(p) for p in pieces]
    out.append(decoder.finish())
    return np.concatenate(out)


def wav(fmt_body: bytes, data: bytes, extra_before: bytes = b"", extra_after: bytes = b"") -> bytes:
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_body)) + fmt_body + extra_before \
        + b"data" + struct.pack("<I", len(data)) + data + extra_after
    return b"RIFF" + struct.pack("<I", len(body)) + body


def float_fmt(channels: int = 1, rate: int = RATE, extensible: bool = False) -> bytes:
    base = struct.pack("<HHIIHH", 0xFFFE if extensible else 3, channels, rate, rate * 4 * channels, 4 * channels, 32)
    if not extensible:
        return base
    guid = struct.pack("<H", 3) + bytes.fromhex("000000001000800000aa00389b71")
    return base + struct.pack("<HHI", 22, 32, 0) + guid


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=4000), min_size=1, max_size=12), st.booleans())
def test_any_split_decodes_like_one_piece(cuts, as_wav):
    pcm = pcm16_audio(1, 3000)
    data = wav_bytes(pcm) if as_wav else pcm.tobytes()
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    spec = AudioSpec() if as_wav else AudioSpec(SampleEncoding.PCM16, RATE)
    np.testing.assert_array_equal(decode(AudioDecoder(spec, RATE), pieces), as_float(pcm))


def test_float_wav_extensible_with_odd_chunk_before_data_and_trailing_chunk():
    samples = np.linspace(-0.5, 0.5, 1000, dtype=np.float32)
    odd_chunk = b"LIST" + struct.pack("<I", 3) + b"abc" + b"\x00"  # padded to even
    trailing = b"LIST" + struct.pack("<I", 4) + b"junk"
    data = wav(float_fmt(extensible=True), samples.astype("<f4").tobytes(), odd_chunk, trailing)
    decoder = AudioDecoder(AudioSpec(), RATE)
    np.testing.assert_array_equal(decode(decoder, [data[:7], data[7:50], data[50:]]), samples)
    assert decoder.format.wav and decoder.format.encoding is SampleEncoding.FLOAT32


def test_stereo_is_mixed_down():
    left = np.full(100, 0.5, dtype=np.float32)
    right = np.full(100, -0.25, dtype=np.float32)
    data = wav(float_fmt(channels=2), np.stack([left, right], axis=1).astype("<f4").tobytes())
    np.testing.assert_allclose(decode(AudioDecoder(AudioSpec(), RATE), [data]), 0.125)


def test_resampling_streams_like_one_shot():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(8000 * 2) * 0.1).astype(np.float32)
    one = decode(AudioDecoder(AudioSpec(SampleEncoding.FLOAT32, 8000), RATE), [x.astype("<f4").tobytes()])
    raw = x.astype("<f4").tobytes()
    many = decode(AudioDecoder(AudioSpec(SampleEncoding.FLOAT32, 8000), RATE),
                  [raw[i:i + 999] for i in range(0, len(raw), 999)])
    assert abs(one.size - 2 * x.size) <= 2 and one.size == many.size
    np.testing.assert_allclose(one, many, atol=1e-5)


@pytest.mark.parametrize("spec, pieces, message", [
    (AudioSpec(SampleEncoding.PCM16, RATE), [b"\x01\x02\x03"], "partial PCM16 sample: 1 trailing byte"),
    (AudioSpec(SampleEncoding.PCM16, RATE, channels=2), [b"\x00" * 6], "whole 4-byte frames"),
    (AudioSpec(), [b"\x00" * 100], "sample_rate is required"),
    (AudioSpec(), [wav(float_fmt(), b"")[:20]], "ended inside the WAV header"),
    (AudioSpec(), [b"RIFF" + b"\x00" * 4 + b"WAVE" + b"data" + b"\x00" * 8], "data chunk comes before the fmt"),
    (AudioSpec(sample_rate=8000), [wav(float_fmt(), b"")], "WAV header says 16000 Hz"),
    (AudioSpec(), [wav(float_fmt(rate=4000), b"")], "WAV sample rate 4000 Hz is outside"),
    (AudioSpec(SampleEncoding.FLOAT32, RATE), [np.array([np.inf], dtype="<f4").tobytes()], "NaN or infinite"),
])
def test_bad_audio_says_what_is_wrong(spec, pieces, message):
    with pytest.raises(AudioError, match=message.replace("(", r"\(")):
        decode(AudioDecoder(spec, RATE), pieces)


def test_header_without_data_chunk_is_bounded():
    junk_chunk = b"junk" + struct.pack("<I", 5000) + bytes(5000)
    data = b"RIFF" + struct.pack("<I", 0) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + float_fmt() + junk_chunk
    with pytest.raises(AudioError, match="no data chunk within the first 1024 bytes"):
        AudioDecoder(AudioSpec(), RATE, max_header_bytes=1024).feed(data)


def test_empty_audio_decodes_to_nothing():
    assert decode(AudioDecoder(AudioSpec(), RATE), []).size == 0


def test_bad_spec_is_refused():
    with pytest.raises(AudioError, match="sample_rate 100 Hz"):
        AudioSpec(sample_rate=100)


def words_from_tokens(tokens: tuple[TokenEvent, ...], frame_seconds: float):
    return utterance_words(Utterance.of_tokens(0, "", tokens, 0.0, 0.0, UtteranceEnd.END_OF_AUDIO), frame_seconds)


def test_words_from_tokens():
    tokens = (TokenEvent(1, "\u2581the", 0), TokenEvent(2, "\u2581cat", 3), TokenEvent(3, "s", 4),
              TokenEvent(4, " sat", 9))
    words = words_from_tokens(tokens, 0.08)
    assert [w.word for w in words] == ["the", "cats", "sat"]
    assert [(round(w.start_seconds, 2), round(w.end_seconds, 2)) for w in words] == [(0.0, 0.08), (0.24, 0.4), (0.72, 0.8)]
    assert words_from_tokens((), 0.08) == []


def test_a_final_holds_the_words_and_tokens_of_a_plain_grouping():
    """final_result builds words in one pass and elements in place (a frontend builds every final
    on its event loop); its message must equal the plain grouping's, token by token: markers,
    spaces, pieces of only spaces or only a marker, and long utterances alike."""
    from server.scheduling.stream_events import ChunkResult
    from server.transport.responses import final_result, interim_result, streaming_response

    def plain_words(tokens, fs):  # the definition: a marked piece starts a word once the word has text
        words, text, first, last = [], "", None, None
        for tok in tokens:
            piece = tok.piece.replace("\u2581", " ")
            if piece.startswith(" ") and text.strip():
                words.append((text.strip(), first * fs, (last + 1) * fs))
                text, first = "", None
            if first is None:
                first = tok.frame
            text, last = text + piece, tok.frame
        if text.strip():
            words.append((text.strip(), first * fs, (last + 1) * fs))
        return words

    rng = np.random.default_rng(7)
    vocab = ["\u2581the", "re", "\u2581", " ", "  ", "s", " sat", "\u2581a\u2581b", "x", "\u2581\u2581"]
    fs = 0.08
    for n in (0, 1, 2, 5, 40, 3000):
        ids = rng.integers(0, len(vocab), n)
        tokens = tuple(TokenEvent(int(i), vocab[i], int(f)) for i, f in zip(ids, np.cumsum(rng.integers(0, 3, n))))
        u = Utterance.of_tokens(3, "text", tokens, 1.5, 9.0, UtteranceEnd.END_OF_AUDIO)
        assert u.tokens == tokens
        r = final_result(u, fs)
        assert [(w.word, w.start_seconds, w.end_seconds) for w in r.words] == [
            (t, pytest.approx(a, abs=1e-6), pytest.approx(b, abs=1e-6)) for t, a, b in plain_words(tokens, fs)]
        assert [(w.word, w.start_seconds, w.end_seconds) for w in words_from_tokens(tokens, fs)] == [
            (t, pytest.approx(a, abs=1e-6), pytest.approx(b, abs=1e-6)) for t, a, b in plain_words(tokens, fs)]
        assert [(t.token_id, t.piece) for t in r.tokens] == [(t.token_id, t.piece) for t in tokens]
        assert [t.start_seconds for t in r.tokens] == pytest.approx([t.frame * fs for t in tokens], abs=1e-6)
        assert (r.transcript, r.is_final, r.utterance_index, r.end_reason) == ("text", True, 3, "end_of_audio")
        if n >= 40:
            assert len(r.words) > 3  # the vocabulary makes words, so the comparison is not over empty lists
        # a response writes its finals in place (results.add()): the same messages, in order
        second = Utterance.of_tokens(4, "more", tokens[::-1], 9.0, 9.5, UtteranceEnd.CLIENT)
        event = ChunkResult("s", 7, "open", "", False, 9.6, 0.0, 5, (u, second))
        response = streaming_response(event, True, fs)
        assert list(response.results) == [final_result(u, fs), final_result(second, fs), interim_result(event)]


def test_sniff_audio_start_judges_the_first_bytes():
    """One judgement of a stream's first bytes for both APIs (server/transport/wav_header.py):
    what could still begin a WAV header waits, a header cut off by the end is an error, anything
    else is raw audio."""
    from server.transport.wav_header import sniff_audio_start

    full = wav_bytes(np.zeros(1600, dtype=np.int16), RATE)
    for prefix in (b"", b"R", b"RIF", b"RIFF\x00\x00", full[:11]):
        assert sniff_audio_start(prefix, False, 1 << 16).need_more, prefix
    assert sniff_audio_start(full[:30], False, 1 << 16).need_more       # inside the header
    with pytest.raises(AudioError, match="ended inside the WAV header"):
        sniff_audio_start(full[:30], True, 1 << 16)
    start = sniff_audio_start(full, False, 1 << 16)
    assert not start.need_more and start.header is not None and start.header.sample_rate == RATE
    for raw in (b"\x01\x02", b"RIFX", b"RIFF\x00\x00\x00\x00WAVX", b"RI"):
        final = raw == b"RI"  # a stream that ended after two bytes is raw audio, not a header
        start = sniff_audio_start(raw, final, 1 << 16)
        assert start.header is None and not start.need_more, raw
