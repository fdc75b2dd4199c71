"""StreamingEngine._validate: a step's plan checked as array operations (no Python per row but
the bad ones). Against the rules written out row by row, in order (the form it had before),
over random plans of good and bad rows: the same rows refused, for the same reasons, or none."""

from __future__ import annotations

import numpy as np
import pytest

from engines.api import BadChunkError, EngineError, RowSamples, StepPlan


def _rules_row_by_row(engine, plan: StepPlan) -> dict[str, str]:
    """The rules one row at a time: a row's reason is the first that holds; a slot served by an
    earlier row of the step (one that broke no rule) appears twice."""
    bad, seen = {}, set()
    for i, sid in enumerate(plan.stream_ids):
        slot, x = int(plan.slots[i]), plan.samples[i]
        f, e = bool(plan.first[i]), bool(plan.audio_ended[i])
        typed = isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 1
        n = len(x) if typed else 0
        if not (0 <= slot < engine.capacity and engine.allocator.is_used(slot)):
            reason = f"slot {slot} is not allocated (unknown stream)"
        elif slot in seen:
            reason = f"slot {slot} appears twice in one step"
        elif not typed:
            reason = "audio must be a 1-D float32 numpy array"
        elif n == 0 and not e:
            reason = "empty chunk while the stream's audio continues"
        elif engine.finished[slot] and not f:
            reason = "the stream has already been finalized"
        elif e and engine._frames_left(slot, n, f) <= 0:
            reason = "the chunk holds no audio frames (the stream is already complete)"
        else:
            seen.add(slot)
            continue
        bad[sid] = reason
    return bad


def _random_plan(rng, engine, slots, flat: bool) -> StepPlan:
    n = int(rng.integers(1, 5))
    g = engine.geometry
    ids, rows, samples, first, ended = [], [], [], [], []
    for i in range(n):
        kind = rng.random()
        slot = int(rng.choice(slots)) if kind < 0.95 else int(rng.choice([-1, engine.capacity, 15]))
        length = int(rng.choice([0, 1, 100, g.chunk_samples, g.samples_needed(0)], p=[0.05, 0.05, 0.1, 0.4, 0.4]))
        x = (rng.standard_normal(length) * 0.1).astype(np.float32)
        if not flat and rng.random() < 0.03:
            x = x.astype(np.float64) if rng.random() < 0.5 else x.reshape(1, -1)
        ids.append(f"s{i}")
        rows.append(slot)
        samples.append(x)
        first.append(bool(rng.random() < 0.3))
        ended.append(bool(rng.random() < 0.15))
    if flat:
        lengths = np.array([len(x) for x in samples])
        samples = RowSamples(np.concatenate(samples), np.concatenate([[0], np.cumsum(lengths)]))
    return StepPlan.from_columns(ids, np.array(rows), samples, np.array(first), np.array(ended),
                                 np.zeros(n, dtype=bool))


@pytest.mark.parametrize("flat", [False, True])
def test_the_plan_is_refused_row_for_row_as_the_rules_say(tiny_engine, flat):
    rng = np.random.default_rng(7 + flat)
    slots = [tiny_engine.acquire_slot() for _ in range(12)]
    try:
        g = tiny_engine.geometry
        refused = 0
        for case in range(400):
            # the streams' books: some finished, some far into their audio (a last chunk may hold nothing new)
            for s in slots:
                tiny_engine.finished[s] = rng.random() < 0.05
                tiny_engine.chunks_done[s] = int(rng.integers(0, 4))
                tiny_engine.featurizer.samples_seen[s] = g.lead_in + int(rng.integers(0, 4)) * g.chunk_samples
            plan = _random_plan(rng, tiny_engine, slots, flat)
            want = _rules_row_by_row(tiny_engine, plan)
            if not want:
                tiny_engine._validate(plan)
                continue
            refused += 1
            with pytest.raises(BadChunkError) as err:
                tiny_engine._validate(plan)
            assert err.value.stream_ids == tuple(want), (case, want, str(err.value))
            assert str(err.value) == "invalid chunks: " + "; ".join(f"{k}: {v}" for k, v in want.items()), case
        assert 80 < refused < 320, refused  # both outcomes, many times: not vacuous
    finally:
        for s in slots:
            tiny_engine.finished[s] = False
            tiny_engine.chunks_done[s] = 0
            tiny_engine.featurizer.samples_seen[s] = 0
            tiny_engine.release_slot(s)


def test_a_plan_over_the_batch_limit_is_an_engine_error(tiny_engine):
    slots = [tiny_engine.acquire_slot() for _ in range(tiny_engine.max_batch + 1)]
    try:
        n = tiny_engine.geometry.samples_needed(0)
        plan = StepPlan.from_columns([f"s{i}" for i in range(len(slots))], np.array(slots),
                                     [np.zeros(n, np.float32)] * len(slots), np.ones(len(slots), bool),
                                     np.zeros(len(slots), bool), np.zeros(len(slots), bool))
        with pytest.raises(EngineError, match="max_batch"):
            tiny_engine._validate(plan)
    finally:
        for s in slots:
            tiny_engine.release_slot(s)
