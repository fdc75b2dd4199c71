"""The shipped demo model (builtin:demo) on speech it was never trained on: the unseen evaluation
set of train/render_unseen.py (120 English and 120 Hindi everyday sentences of train/unseen/*.txt,
each spoken twice, in voice variants and at rates that training never used, once by espeakng-loader's
library build that training used and once by Debian's eSpeak NG 1.51 program), streamed through a
real gRPC server on loopback at 160 ms lookahead and scored with train/wer.py.

What each test judges:

- the committed sample (tests/data/unseen/, 24 clips, every fifth sentence, written by
  render_unseen.py --sample-out): a quick guard that needs no eSpeak. SAMPLE_GUARD is this
  model's level on it with a margin. The sample is too small to judge the issue's targets (it
  meets them while the whole set does not), so it only catches a model that got worse.
- the whole set, rendered at test time into a temporary folder (about 5 s; rendering is seeded,
  so the audio repeats run to run): GUARD is this model's level with a margin,
  so a regression of a few points fails; Hindi must meet the issue's target (15%), which this
  model does; English's target (10%) is not reached yet, an expected failure, strict, so that the
  model that reaches it has to turn it into a plain test. Without espeakng-loader (the dev extra)
  or the `espeak-ng` program (`apt-get install espeak-ng`; .ci/run installs it) these skip.

Measured with this model (commit 5e336dd's weights; 160 ms, through the server): whole set
English 14.8% and 14.5%, Hindi 8.8%, in two runs of train/evaluate.py (whose client splits the
audio differently from this test's); the sample English 3.5%, Hindi 6.9% (3 of 85 and 5 of 72 words). The model before
it (commit 3bfe6df): whole set 16.2%, 11.3%. Batches form by timing, so a figure can move by a
word or two run to run. Each GUARD leaves two words or more of margin on the sample and about
2.7 points on the whole set (Debian's `espeak-ng` on another release may render its half a little
differently); the model of commit b2be0f0 (26.9%, 13.1%) fails the English bounds of both and
the whole set's Hindi bound.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "data", "unseen")
WEIGHTS = os.path.join(ROOT, "engines", "assets", "demo", "weights.pt")
RENDER = os.path.join(ROOT, "train", "render_unseen.py")
TARGET = {"en": 0.10, "hi": 0.15}           # issue 20, on the whole unseen set
GUARD = {"en": 0.175, "hi": 0.115}          # whole set: measured en 14.8%, hi 8.8%
SAMPLE_GUARD = {"en": 0.08, "hi": 0.125}    # the sample (85, 72 words): measured en 3.5%, hi 6.9%
CONCURRENCY = 16                            # streams open at once: one full engine batch

pytestmark = pytest.mark.skipif(not os.path.isfile(WEIGHTS), reason=f"demo model weights missing: {WEIGHTS}")

sys.path.insert(0, os.path.join(ROOT, "train"))
from tests.manifest_clips import manifest_clips  # noqa: E402
from wer import wer_by_lang  # noqa: E402


def _missing_renderer() -> str | None:
    """Why the whole unseen set cannot be rendered here, or None."""
    if importlib.util.find_spec("espeakng_loader") is None:
        return "espeakng-loader is not installed (the dev extra): no library build to render the unseen set with"
    if shutil.which("espeak-ng") is None:
        return "no `espeak-ng` program (apt-get install espeak-ng): no Debian build to render the unseen set with"
    return None


@pytest.fixture(scope="module")
def engine():
    import torch
    from nemo.utils import logging as nemo_logging
    from engines.config import EngineConfig
    from engines.factory import build_engine
    nemo_logging.setLevel(40)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small CPU models step fastest on one thread
    try:
        yield build_engine(EngineConfig(model="builtin:demo", engine="eager", device="cpu", dtype="float32",
                                        lookahead_ms=160, max_streams=2 * CONCURRENCY, max_batch=CONCURRENCY))
    finally:
        torch.set_num_threads(threads)


def _server_transcripts(engine, clips: list[dict]) -> list[str]:
    """Every clip streamed through one server, CONCURRENCY streams at a time (batched as in service)."""
    from tests.server_harness import final_transcript, requests_for, run_stream, running_server, stub_for

    async def run():
        gate = asyncio.Semaphore(CONCURRENCY)
        async with running_server(engine) as server, stub_for(server) as stub:
            async def one(i, clip):
                async with gate:
                    return await run_stream(stub, requests_for(clip["pcm"].tobytes(), seed=i))
            return await asyncio.gather(*(one(i, c) for i, c in enumerate(clips)))
    results = asyncio.run(run())
    assert engine.slots_in_use() == 0
    return [final_transcript(rs) for rs in results]


@pytest.fixture(scope="module")
def sample() -> list[dict]:
    return manifest_clips(SAMPLE)


@pytest.fixture(scope="module")
def sample_transcripts(engine, sample) -> list[str]:
    return _server_transcripts(engine, sample)


@pytest.fixture(scope="module")
def whole_set(tmp_path_factory) -> list[dict]:
    """The whole unseen set, rendered here by train/render_unseen.py."""
    missing = _missing_renderer()
    if missing:
        pytest.skip(missing)
    out = tmp_path_factory.mktemp("unseen")
    done = subprocess.run([sys.executable, RENDER, "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"render_unseen.py failed:\n{done.stderr}"
    return manifest_clips(str(out))


@pytest.fixture(scope="module")
def whole_transcripts(engine, whole_set) -> list[str]:
    return _server_transcripts(engine, whole_set)


def _wer(clips, hyps) -> dict[str, float]:
    return wer_by_lang([r["text"] for r in clips], hyps, [r["lang"] for r in clips])


def _detail(clips, hyps, worst: int = 30) -> str:
    """The clips whose transcript differs from the text (the first `worst` of them)."""
    wrong = [(r, h) for r, h in zip(clips, hyps) if r["text"] != h.strip()]
    lines = [f"  {r['audio_filepath']} ({r['voice']}, {r['build']}): {r['text']!r} -> {h!r}" for r, h in wrong[:worst]]
    return "\n".join(lines + ([f"  ... and {len(wrong) - worst} more"] if len(wrong) > worst else []))


# -- the committed sample: a quick guard without eSpeak -------------------------------------------
def test_sample_is_unseen_speech_of_both_languages_and_builds(sample):
    from synth_data import UNSEEN_VARIANTS
    assert {r["lang"] for r in sample} == {"en", "hi"}
    assert {r["build"] for r in sample} == {"library", "debian"}
    assert all(r["voice"].split("+")[1] in UNSEEN_VARIANTS and r["rate"] % 2 == 1 for r in sample)
    with open(os.path.join(ROOT, "train", "unseen", "en.txt"), encoding="utf-8") as f:
        en = {line.strip() for line in f}
    assert {r["text"] for r in sample if r["lang"] == "en"} <= en


def _assert_guarded(items, hyps, guard: dict[str, float]) -> None:
    """Every transcript non-empty and each language's WER within its bound."""
    assert all(h.strip() for h in hyps), _detail(items, hyps)
    wer = _wer(items, hyps)
    over = {lang: wer[lang] for lang, bound in guard.items() if wer[lang] > bound}
    assert not over, f"WER {wer} over {guard} in {sorted(over)}\n{_detail(items, hyps)}"


def test_unseen_sample_through_server_at_160ms(sample, sample_transcripts):
    _assert_guarded(sample, sample_transcripts, SAMPLE_GUARD)


# -- the whole set, rendered here: the targets --------------------------------------------
def test_whole_set_holds_the_sample(sample, whole_set):
    """The committed sample is part of what render_unseen.py renders now (same sentences, voices,
    rates and builds), so the two sets of figures are about the same speech."""
    assert len(whole_set) == 240 and {r["lang"] for r in whole_set} == {"en", "hi"}
    key = ("audio_filepath", "text", "lang", "voice", "rate", "build")
    rendered = {tuple(r[k] for k in key) for r in whole_set}
    assert {tuple(r[k] for k in key) for r in sample} <= rendered


def test_whole_unseen_set_through_server_at_160ms(whole_set, whole_transcripts):
    _assert_guarded(whole_set, whole_transcripts, GUARD)


def test_whole_unseen_set_hindi_meets_the_target(whole_set, whole_transcripts):
    wer = _wer(whole_set, whole_transcripts)
    assert wer["hi"] <= TARGET["hi"], f"Hindi WER {wer['hi']:.1%} > the target {TARGET['hi']:.0%} ({wer})"


@pytest.mark.xfail(strict=True, reason="issue 20's English target (10% on the whole unseen set at 160 ms) is not "
                                       "reached by the shipped model yet (16.2%; train/results/RESULTS.md)")
def test_whole_unseen_set_english_meets_the_target(whole_set, whole_transcripts):
    wer = _wer(whole_set, whole_transcripts)
    assert wer["en"] <= TARGET["en"], f"English WER {wer['en']:.1%} > the target {TARGET['en']:.0%} ({wer})"
