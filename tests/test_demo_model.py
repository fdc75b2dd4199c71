"""The shipped demo model (builtin:demo) transcribes the example files (examples/, held-out
eSpeak NG utterances, half of them in a voice variant never heard in training).

Words, not self-comparison: a mistake in features, chunking, lookahead, batching or decoder
state shows up as wrong words. Bounds: word error rate over the examples of each language at
most 10% for English and 15% for Hindi (the issue's targets for the whole held-out set) at
160 ms; at most 25% at the other lookaheads. Streaming through a real gRPC server on loopback
must give exactly the transcripts of each stream run through the engine alone, and those must
be the offline (whole-utterance) decoding of the same model up to the first-chunk convention.
"""

from __future__ import annotations

import asyncio
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
WEIGHTS = os.path.join(ROOT, "engines", "assets", "demo", "weights.pt")
BOUND_160 = {"en": 0.10, "hi": 0.15}
BOUND_OTHER = 0.25

pytestmark = pytest.mark.skipif(not os.path.isfile(WEIGHTS), reason=f"demo model weights missing: {WEIGHTS}")

sys.path.insert(0, os.path.join(ROOT, "train"))
from tests.manifest_clips import manifest_clips  # noqa: E402
from wer import normalize, wer_by_lang  # noqa: E402


def _examples() -> list[dict]:
    return manifest_clips(EXAMPLES)


@pytest.fixture(scope="module")
def examples():
    rows = _examples()
    assert {r["lang"] for r in rows} == {"en", "hi"}
    return rows


def _engine(lookahead_ms: int):
    from nemo.utils import logging as nemo_logging
    nemo_logging.setLevel(40)
    from engines.config import EngineConfig
    from engines.factory import build_engine
    return build_engine(EngineConfig(model="builtin:demo", engine="eager", device="cpu", dtype="float32",
                                     lookahead_ms=lookahead_ms, max_streams=16, max_batch=8))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small CPU models step fastest on one thread, and far faster on a busy machine."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine160():
    engine = _engine(160)
    yield engine
    assert engine.slots_in_use() == 0


@pytest.fixture(scope="module")
def alone160(engine160, examples) -> list[str]:
    """Each example streamed through the engine by itself (the reference for the server)."""
    return _alone(engine160, examples)


def _wer(rows, hyps):
    return wer_by_lang([r["text"] for r in rows], hyps, [r["lang"] for r in rows])


def _detail(rows, hyps) -> str:
    return "\n".join(f"  {r['audio_filepath']}: {r['text']!r} -> {h!r}" for r, h in zip(rows, hyps))


def _alone(engine, rows) -> list[str]:
    from tests.engine_alone import transcribe_alone
    return [transcribe_alone(engine, r["pcm"].astype(np.float32) / np.float32(32768.0)) for r in rows]


def test_model_is_trained_and_bilingual(engine160):
    info = engine160.model_info
    assert not info.random_weights
    assert info.lookaheads_ms == (80, 160, 560, 1120)
    pieces = engine160.model.pieces
    assert any("a" <= ch <= "z" for p in pieces for ch in p)
    assert any("\u0900" <= ch <= "\u097f" for p in pieces for ch in p)  # Devanagari


def test_engine_transcribes_examples_at_160ms(alone160, examples):
    hyps = alone160
    wer = _wer(examples, hyps)
    for lang, bound in BOUND_160.items():
        assert wer[lang] <= bound, f"{lang} WER {wer[lang]:.1%} > {bound:.0%}\n{_detail(examples, hyps)}"


def test_streaming_matches_offline_decoding(engine160, alone160, examples):
    """The same weights decoded over whole utterances (NeMo's forward at the same attention
    context) give nearly the same words as streaming. They are not identical by construction
    (streaming frames after 6 ms of lead-in silence and its first chunk sees less left context);
    on the 300-utterance held-out set 92% of transcripts agree exactly (train/results/), and a
    framing or cache mistake would make them disagree on most words."""
    sys.path.insert(0, os.path.join(ROOT, "train"))
    from evaluate import offline_transcripts
    audios = [r["pcm"].astype(np.float32) / np.float32(32768.0) for r in examples]
    offline = offline_transcripts(engine160.model.nemo_model, audios)
    streaming = alone160
    same = sum(normalize(a) == normalize(b) for a, b in zip(offline, streaming))
    disagreement = wer_by_lang(offline, streaming, ["all"] * len(offline))["all"]
    assert same >= len(examples) // 2 and disagreement <= 0.10, f"offline vs streaming: {list(zip(offline, streaming))}"


def test_mixed_batches_equal_streams_alone(engine160, alone160, examples):
    """The engine-core exactness test with trained weights: the examples streamed together in
    shuffled, staggered batches give each stream exactly its tokens alone."""
    from tests.engine_helpers import run_streams
    audios = {f"x{i}": r["pcm"].astype(np.float32) / np.float32(32768.0) for i, r in enumerate(examples)}
    for seed in (1, 2):
        starts = {sid: (i * seed) % 4 for i, sid in enumerate(audios)}
        mixed = run_streams(engine160, audios, seed=seed, start_step=starts)
        assert [mixed[sid].text for sid in audios] == alone160, f"seed {seed}"


def test_reused_slot_equals_fresh_slot(engine160, alone160, examples):
    """A slot left dirty by another stream's half-finished audio transcribes like a fresh one."""
    from engines.api import ChunkWork, StepPlan
    from tests.engine_helpers import run_streams
    g = engine160.geometry
    dirty = examples[0]["pcm"].astype(np.float32) / np.float32(32768.0)
    slot = engine160.acquire_slot()
    for k in range(3):
        a, b = g.chunk_span(k, len(dirty), True)
        engine160.step(StepPlan((ChunkWork("dirty", slot, dirty[a:b], k == 0, False),)))
    engine160.release_slot(slot)
    again = engine160.acquire_slot()
    try:
        audio = examples[4]["pcm"].astype(np.float32) / np.float32(32768.0)
        reused = run_streams(engine160, {"r": audio}, slots={"r": again}, seed=None)["r"]
    finally:
        engine160.release_slot(again)
    assert reused.text == alone160[4]


def test_transcript_equals_nemo_streaming_loop(engine160, examples):
    """Token for token, NeMo's own conformer_stream_step loop over the same (lead-in framed)
    audio, with trained weights."""
    from tests.engine_helpers import length_nemo_fully_consumes, nemo_reference_tokens, run_alone
    g = engine160.geometry
    for row in (examples[0], examples[5]):
        audio = row["pcm"].astype(np.float32) / np.float32(32768.0)
        n = length_nemo_fully_consumes(g, len(audio) / g.sample_rate)
        audio = np.concatenate([audio, np.zeros(n - len(audio), np.float32)])
        ours = run_alone(engine160, audio)
        ref = nemo_reference_tokens(engine160.model.nemo_model,
                                    np.concatenate([np.zeros(g.lead_in, np.float32), audio]))
        assert len(ref) > 3 and ours.tokens == ref, row["audio_filepath"]


@pytest.mark.asyncio
async def test_server_streams_examples_with_the_right_words(engine160, alone160, examples):
    from tests.server_harness import final_transcript, requests_for, run_stream, running_server, stub_for
    expected = alone160  # computed before the server owns the engine
    async with running_server(engine160) as server, stub_for(server) as stub:
        results = await asyncio.gather(*(
            run_stream(stub, requests_for(r["pcm"].tobytes(), seed=i, interim_results=bool(i % 2)))
            for i, r in enumerate(examples)))
    hyps = [final_transcript(rs) for rs in results]
    assert hyps == expected  # batching on the server changes no word
    wer = _wer(examples, hyps)
    for lang, bound in BOUND_160.items():
        assert wer[lang] <= bound, f"{lang} WER {wer[lang]:.1%} > {bound:.0%}\n{_detail(examples, hyps)}"


@pytest.mark.slow
@pytest.mark.parametrize("lookahead_ms", [80, 560, 1120])
def test_other_lookaheads_transcribe_examples(lookahead_ms, examples):
    engine = _engine(lookahead_ms)
    hyps = _alone(engine, examples)
    wer = _wer(examples, hyps)
    assert max(wer.values()) <= BOUND_OTHER, f"{lookahead_ms} ms: WER {wer}\n{_detail(examples, hyps)}"
