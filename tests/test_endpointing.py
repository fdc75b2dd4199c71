"""Endpointing in the engine step (engines.endpointing): Riva's EndpointingConfig rules on each
encoder frame's non-blank probability, for the whole batch at once.

- The batched tensor computation equals a frame-by-frame reference of the rules, over random
  probabilities, settings, step sizes and resets.
- On speech (the demo model, the example files joined by pauses), utterances end in the pauses
  and each utterance's text is the words spoken in it.
- A stream's utterance boundaries, tokens and their frames are the same alone and in mixed,
  shuffled batches of many streams (CPU, fp32).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.api import EndpointingParams
from engines.endpointing import Endpointer, event_frames
from tests.engine_helpers import run_streams

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# -- the rules, frame by frame ------------------------------------------------------------------
def reference(nonblank: list[float], eou: list[bool], params: EndpointingParams, frame_ms: float,
              resets: set[int]) -> tuple[list[int], list[int]]:
    """Riva's rules as plain Python over one stream's frames: (start frames, end frames).
    `resets`: frames at which the stream starts afresh (a new utterance the client asked for)."""
    ep = Endpointer(1, frame_ms, torch.device("cpu"))
    n_start, n_stop, n_eou = (ep.frames(params.start_history_ms), ep.frames(params.stop_history_ms),
                              ep.frames(params.stop_history_eou_ms))
    W = ep.history_frames
    hist = [0.0] * W
    active = pending = False
    starts, ends = [], []
    for t, (p, e) in enumerate(zip(nonblank, eou)):
        if t in resets:
            hist = [0.0] * W
            active = pending = False
        hist = hist[1:] + [p]

        def mass(n):
            return sum(hist[W - n:]) if n else 0.0

        began = not active and (n_start == 0 or mass(n_start) >= params.start_threshold * n_start)
        active = active or began
        pending = pending or (active and e)
        stop = n_stop > 0 and (n_stop - mass(n_stop)) >= params.stop_threshold * n_stop
        eou_ok = n_eou == 0 or (n_eou - mass(n_eou)) >= params.stop_threshold_eou * n_eou
        ended = active and not began and (stop or (pending and eou_ok))
        if ended:
            active = pending = False
        if began:
            starts.append(t)
        if ended:
            ends.append(t)
    return starts, ends


def _random_stream(rng: random.Random, frames: int) -> tuple[list[float], list[bool]]:
    """Speech-like runs: bursts of non-blank frames between silences, some frames fractional.
    Dyadic values, exact in float32 and float64 alike, so a window that sits exactly on its
    threshold is decided the same way here and on the device."""
    probs, eous = [], []
    speaking = False
    for _ in range(frames):
        if rng.random() < 0.15:
            speaking = not speaking
        p = rng.choice([1.0, 0.875, 0.25, 0.0, 0.0]) if speaking else rng.choice([0.0, 0.0, 0.0078125, 0.125])
        probs.append(p)
        eous.append(not speaking and rng.random() < 0.1)
    return probs, eous


@pytest.mark.parametrize("frames_per_step", [1, 2, 7, 14])
def test_batched_rules_equal_the_frame_by_frame_reference(frames_per_step):
    rng = random.Random(frames_per_step)
    frame_ms = 80.0
    B, steps = 6, 40
    ep = Endpointer(B, frame_ms, torch.device("cpu"))
    streams, params, resets = [], [], []
    for b in range(B):
        p = EndpointingParams(start_history_ms=rng.choice([0, 80, 240, 400]), start_threshold=rng.choice([0.25, 0.5]),
                              stop_history_ms=rng.choice([0, 160, 320, 640]), stop_threshold=rng.choice([0.875, 0.96875]),
                              stop_history_eou_ms=rng.choice([0, 160]), stop_threshold_eou=0.875)
        params.append(p)
        ep.configure(b, p)
        streams.append(_random_stream(rng, steps * frames_per_step))
        resets.append({k * frames_per_step for k in range(1, steps) if rng.random() < 0.05})
    hist = torch.zeros(B, ep.history_frames)
    flags = torch.zeros(B, 2)
    got_starts: dict[int, list[int]] = {b: [] for b in range(B)}
    got_ends: dict[int, list[int]] = {b: [] for b in range(B)}
    slots = np.arange(B)
    total = steps * frames_per_step
    pos = [0] * B  # each stream's next frame
    while any(p < total for p in pos):
        # A random subset of the streams steps each time, in shuffled order (rows != slots).
        rows = [b for b in range(B) if pos[b] < total and rng.random() < 0.7]
        if not rows:
            continue
        rng.shuffle(rows)
        nb = torch.tensor([streams[b][0][pos[b]:pos[b] + frames_per_step] for b in rows])
        eou = torch.tensor([streams[b][1][pos[b]:pos[b] + frames_per_step] for b in rows])
        reset = torch.tensor([pos[b] in resets[b] for b in rows])
        valid = torch.full((len(rows),), frames_per_step)
        events, new_hist, new_flags = ep.step(slots[rows], nb, eou, valid, reset, hist[rows], flags[rows])
        hist[rows], flags[rows] = new_hist, new_flags
        starts, ends = event_frames(events, np.array([pos[b] for b in rows]))
        for i, b in enumerate(rows):
            got_starts[b] += starts.get(i, ())
            got_ends[b] += ends.get(i, ())
            pos[b] += frames_per_step
    total_events = 0
    for b in range(B):
        want_starts, want_ends = reference(*streams[b], params[b], frame_ms, resets[b])
        assert got_starts[b] == want_starts, (b, params[b])
        assert got_ends[b] == want_ends, (b, params[b])
        total_events += len(want_ends)
    assert total_events > 5  # the random streams did exercise the stop rule


def test_disabled_streams_get_no_events_and_short_chunks_count_only_their_frames():
    ep = Endpointer(2, 80.0, torch.device("cpu"))
    ep.configure(0, None)
    ep.configure(1, EndpointingParams(start_history_ms=80, stop_history_ms=160))
    nb = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    valid = torch.tensor([4, 3])  # row 1's last frame does not exist (a short last chunk)
    events, hist, flags = ep.step(np.array([0, 1]), nb, None, valid, None, torch.zeros(2, ep.history_frames),
                                  torch.zeros(2, 2))
    starts, ends = event_frames(events, np.zeros(2, dtype=np.int64))
    assert 0 not in starts and 0 not in ends
    assert starts[1] == (0,) and ends[1] == (2,)
    assert hist[1, -1].item() == 0.0  # the missing frame entered the history as nothing


# -- on speech ---------------------------------------------------------------------------------
def _examples() -> dict[str, str]:
    return {e["audio_filepath"].split("/")[-1]: e["text"] for e in
            (json.loads(line) for line in (EXAMPLES / "manifest.json").read_text().splitlines() if line.strip())}


def _call(names: list[str], pause_s: float, rate: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """The example clips joined by pauses of silence; the speech spans in seconds."""
    import soundfile as sf

    parts, spans, at = [np.zeros(int(0.3 * rate), np.float32)], [], 0.3
    for name in names:
        clip, sr = sf.read(EXAMPLES / name, dtype="float32")
        assert sr == rate
        parts += [clip, np.zeros(int(pause_s * rate), np.float32)]
        spans.append((at, at + len(clip) / rate))
        at += len(clip) / rate + pause_s
    return np.concatenate(parts), spans


@pytest.fixture(scope="module")
def demo_engine():
    from engines.config import EngineConfig
    from engines.factory import build_engine
    from tests.conftest import _quiet_nemo

    _quiet_nemo()
    engine = build_engine(EngineConfig(model="builtin:demo", engine="eager", device="cpu", dtype="float32",
                                       lookahead_ms=160, max_streams=8, max_batch=8))
    yield engine
    assert engine.slots_in_use() == 0


CALL = ["en-000000.wav", "en-000001.wav", "hi-000001.wav"]


def test_utterances_end_in_the_pauses_and_hold_their_words(demo_engine):
    g = demo_engine.geometry
    audio, spans = _call(CALL, 1.2, g.sample_rate)
    run = run_streams(demo_engine, {"call": audio}, seed=None, endpointing=EndpointingParams())["call"]
    fs = g.encoder_frame_seconds
    ends = [e * fs for e in run.ends]
    assert len(ends) == len(CALL), ends
    for end, (_, speech_end), next_span in zip(ends, spans, [*spans[1:], (1e9, 1e9)]):
        # stop_history 800 ms of blank after the last word, so inside the pause
        assert speech_end < end < next_span[0], (ends, spans)
    # Each utterance's tokens: those up to its end frame. Every utterance has words, and the
    # first one (the model's state fresh for each utterance with builtin:demo) is exactly what
    # the clip alone gives.
    pieces = demo_engine.model.pieces
    bounds = [-1, *run.ends]
    texts = []
    for lo, hi in zip(bounds, bounds[1:]):
        ids = [t for t, f in zip(run.tokens, run.token_frames) if lo < f <= hi]
        texts.append("".join(pieces[i] for i in ids).replace("\u2581", " ").strip())
    assert all(texts), texts
    alone = run_streams(demo_engine, {"a": _call(CALL[:1], 0.0, g.sample_rate)[0]}, seed=None)["a"]
    assert texts[0] == alone.text.strip()
    reference = _examples()
    for text, name in zip(texts, CALL):
        assert set(text.split()) & set(reference[name].split()), (text, reference[name])


def test_utterance_boundaries_are_batch_invariant(demo_engine):
    """Alone and in mixed, shuffled batches: the same ends, starts, tokens and frames."""
    g = demo_engine.geometry
    rng = np.random.default_rng(3)
    audios = {}
    for i in range(5):
        names = [CALL[(i + j) % len(CALL)] for j in range(2)]
        audio, _ = _call(names, 0.9 + 0.2 * i, g.sample_rate)
        audios[f"s{i}"] = audio[int(rng.integers(0, 2000)):]
    params = EndpointingParams(stop_history_ms=560)
    alone = {sid: run_streams(demo_engine, {sid: a}, seed=None, endpointing=params)[sid] for sid, a in audios.items()}
    mixed = run_streams(demo_engine, audios, seed=11, endpointing=params,
                        start_step={f"s{i}": 3 * i for i in range(5)})
    assert sum(len(r.ends) for r in alone.values()) >= 5
    for sid in audios:
        a, m = alone[sid], mixed[sid]
        assert a.tokens and a.ends, sid
        assert (m.ends, m.starts, m.tokens, m.token_frames) == (a.ends, a.starts, a.tokens, a.token_frames), sid
