"""The shipped demo model (builtin:demo) on speech it was never trained on: a fixed sample of the
unseen evaluation set (tests/data/unseen/, written by train/render_unseen.py: 12 English and 12
Hindi everyday sentences, every fifth of train/unseen/*.txt, in voice variants and at rates that
training never used, half of them spoken by Debian's eSpeak NG 1.51 program instead of the
library build training used), streamed through a real gRPC server on loopback at 160 ms.

Two bounds. GUARD is this model's level on the sample with some margin: the previous,
closed-vocabulary model scored far above it (train/results/RESULTS.md), so a model that only
learned its sentence generator again fails here. TARGET is the issue's goal for the whole unseen
set (English 10%, Hindi 15%), which the shipped model does not reach yet: that test is an
expected failure, strict, so that the model that reaches it has to turn it into a plain test.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "data", "unseen")
WEIGHTS = os.path.join(ROOT, "engines", "assets", "demo", "weights.pt")
TARGET = {"en": 0.10, "hi": 0.15}
GUARD = {"en": 0.25, "hi": 0.25}

pytestmark = pytest.mark.skipif(not os.path.isfile(WEIGHTS), reason=f"demo model weights missing: {WEIGHTS}")

sys.path.insert(0, os.path.join(ROOT, "train"))
from tests.manifest_clips import manifest_clips  # noqa: E402
from wer import wer_by_lang  # noqa: E402


@pytest.fixture(scope="module")
def sample() -> list[dict]:
    return manifest_clips(SAMPLE)


@pytest.fixture(scope="module")
def server_transcripts(sample) -> list[str]:
    """Every sample utterance streamed at once through one server (batched as in service)."""
    import torch
    from nemo.utils import logging as nemo_logging
    from engines.config import EngineConfig
    from engines.factory import build_engine
    from tests.server_harness import final_transcript, requests_for, run_stream, running_server, stub_for
    nemo_logging.setLevel(40)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small CPU models step fastest on one thread
    try:
        engine = build_engine(EngineConfig(model="builtin:demo", engine="eager", device="cpu", dtype="float32",
                                           lookahead_ms=160, max_streams=32, max_batch=16))

        async def run():
            async with running_server(engine) as server, stub_for(server) as stub:
                return await asyncio.gather(*(run_stream(stub, requests_for(r["pcm"].tobytes(), seed=i))
                                              for i, r in enumerate(sample)))
        results = asyncio.run(run())
        assert engine.slots_in_use() == 0
    finally:
        torch.set_num_threads(threads)
    return [final_transcript(rs) for rs in results]


def _wer(sample, hyps) -> dict[str, float]:
    return wer_by_lang([r["text"] for r in sample], hyps, [r["lang"] for r in sample])


def _detail(sample, hyps) -> str:
    return "\n".join(f"  {r['audio_filepath']} ({r['voice']}, {r['build']}): {r['text']!r} -> {h!r}"
                     for r, h in zip(sample, hyps))


def test_sample_is_unseen_speech_of_both_languages_and_builds(sample):
    sys.path.insert(0, os.path.join(ROOT, "train"))
    from synth_data import UNSEEN_VARIANTS
    assert {r["lang"] for r in sample} == {"en", "hi"}
    assert {r["build"] for r in sample} == {"library", "debian"}
    assert all(r["voice"].split("+")[1] in UNSEEN_VARIANTS and r["rate"] % 2 == 1 for r in sample)
    with open(os.path.join(ROOT, "train", "unseen", "en.txt"), encoding="utf-8") as f:
        en = {line.strip() for line in f}
    assert {r["text"] for r in sample if r["lang"] == "en"} <= en


def test_unseen_sample_through_server_at_160ms(sample, server_transcripts):
    hyps = server_transcripts
    assert all(h.strip() for h in hyps), _detail(sample, hyps)
    wer = _wer(sample, hyps)
    for lang, bound in GUARD.items():
        assert wer[lang] <= bound, f"{lang} WER {wer[lang]:.1%} > {bound:.0%}\n{_detail(sample, hyps)}"


@pytest.mark.xfail(strict=True, reason="issue 20's targets (en 10%, hi 15% at 160 ms) are not reached by the "
                                       "shipped model yet (train/results/RESULTS.md)")
def test_unseen_sample_meets_the_targets(sample, server_transcripts):
    wer = _wer(sample, server_transcripts)
    assert all(wer[lang] <= bound for lang, bound in TARGET.items()), wer
