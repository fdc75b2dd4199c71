"""engines.api's columnar plan and result: both views of one step agree, and the real engine
answers a plan built from columns exactly as one built from ChunkWork rows."""

from __future__ import annotations

import numpy as np
import pytest

from engines.api import (BadChunkError, ChunkWork, EndpointingParams, EngineError, ResultColumns, RowSamples,
                         StepPlan, StepResult, StreamUpdate, TokenEvent)


def test_a_plan_from_columns_offers_the_same_rows_as_chunk_work():
    samples = [np.full(n, i, np.float32) for i, n in enumerate((5, 3, 7))]
    ep = EndpointingParams(stop_history_ms=400)
    plan = StepPlan.from_columns(["a", "b", "c"], np.array([4, 0, 9]), samples, np.array([True, False, True]),
                                 np.array([False, False, True]), np.array([False, True, False]), {2: ep})
    assert len(plan) == 3
    assert plan.chunks == (ChunkWork("a", 4, samples[0], True, False, None, False),
                           ChunkWork("b", 0, samples[1], False, False, None, True),
                           ChunkWork("c", 9, samples[2], True, True, ep, False))
    again = StepPlan(plan.chunks)  # and back to columns from the rows
    assert again.stream_ids == ["a", "b", "c"] and again.slots.tolist() == [4, 0, 9]
    assert again.first.tolist() == [True, False, True] and again.audio_ended.tolist() == [False, False, True]
    assert again.new_utterance.tolist() == [False, True, False] and again.endpointing == {2: ep}
    assert all(x is y for x, y in zip(again.samples, samples))
    with pytest.raises(ValueError, match="one entry per row"):
        StepPlan.from_columns(["a"], np.array([1, 2]), samples[:1], [True], [False], [False])


def test_row_samples_are_the_rows_of_one_flat_array():
    flat = np.arange(20, dtype=np.float32)
    rows = RowSamples(flat, np.array([0, 4, 4, 8, 12, 20]))
    assert len(rows) == 5 and rows.lengths.tolist() == [4, 0, 4, 4, 8]
    assert [x.tolist() for x in rows] == [flat[0:4].tolist(), [], flat[4:8].tolist(), flat[8:12].tolist(),
                                          flat[12:20].tolist()]
    assert rows[-1].tolist() == flat[12:20].tolist() and np.shares_memory(rows[2], flat)  # views, not copies
    with pytest.raises(IndexError):
        rows[5]
    assert rows.stack(np.array([2, 3]), 4).tolist() == [flat[4:8].tolist(), flat[8:12].tolist()]  # one slice
    assert rows.stack(np.array([0, 3]), 4).tolist() == [flat[0:4].tolist(), flat[8:12].tolist()]  # gathered
    plan = StepPlan.from_columns(list("abcde"), np.arange(5), rows, np.zeros(5, bool), np.zeros(5, bool),
                                 np.zeros(5, bool))
    assert plan.samples is rows and plan.chunks[4].samples.tolist() == flat[12:20].tolist()


def test_a_plan_of_other_entries_is_an_engine_error():
    with pytest.raises(EngineError, match="must be ChunkWork"):
        StepPlan(("not a chunk",)).slots


def test_result_columns_and_updates_round_trip():
    updates = (
        StreamUpdate("a", 3, (TokenEvent(5, "\u2581x", 12), TokenEvent(6, "y", 13)), " xy", False, 14, 1.12),
        StreamUpdate("b", 1, (), "", False, 14, 1.12, starts=(9,)),
        StreamUpdate("c", 0, (TokenEvent(2, "\u2581z", 3),), " z", True, 4, 0.3, ends=(3,)),
    )
    cols = StepResult(updates, "eager").columns
    assert cols.token_offsets.tolist() == [0, 2, 2, 3] and cols.token_ids.tolist() == [5, 6, 2]
    assert cols.is_final.tolist() == [False, False, True] and cols.starts == {1: (9,)} and cols.ends == {2: (3,)}
    assert [cols.tokens_of(i) for i in range(3)] == [u.tokens for u in updates]
    rebuilt = StepResult.from_columns(cols, "eager")
    assert len(rebuilt) == 3 and rebuilt.updates == updates


def test_an_empty_result_has_empty_columns():
    cols = ResultColumns.of_updates(())
    assert cols.token_offsets.tolist() == [0] and StepResult.from_columns(cols, "e").updates == ()


def test_the_engine_answers_a_column_plan_as_a_row_plan(tiny_engine):
    g = tiny_engine.geometry
    rng = np.random.default_rng(7)
    clips = [(rng.standard_normal(int(g.sample_rate * s)) * 0.1).astype(np.float32) for s in (1.3, 0.7, 2.1)]
    ep = EndpointingParams(stop_history_ms=160, stop_threshold=0.5)

    def run(form: str) -> list[tuple]:
        slots = [tiny_engine.acquire_slot() for _ in clips]
        out = []
        try:
            k = 0
            while True:
                rows = []
                for i, (clip, slot) in enumerate(zip(clips, slots)):
                    if k >= g.total_chunks(len(clip)):
                        continue
                    a, b = g.chunk_span(k, len(clip), True)
                    rows.append(ChunkWork(f"s{i}", slot, clip[a:b], k == 0, b == len(clip),
                                          ep if k == 0 and i == 1 else None, k == 3 and i == 2))
                if not rows:
                    return out
                if form != "rows":
                    samples = [r.samples for r in rows]
                    if form == "flat":  # as an engine worker gets them: one buffer, per-row offsets
                        offsets = np.concatenate([[0], np.cumsum([len(x) for x in samples])])
                        samples = RowSamples(np.concatenate([np.zeros(5, np.float32), *samples]), offsets + 5)
                    plan = StepPlan.from_columns([r.stream_id for r in rows], np.array([r.slot for r in rows]),
                                                 samples, np.array([r.first for r in rows]),
                                                 np.array([r.audio_ended for r in rows]),
                                                 np.array([r.new_utterance for r in rows]),
                                                 {j: r.endpointing for j, r in enumerate(rows) if r.endpointing})
                else:
                    plan = StepPlan(tuple(rows))
                result = tiny_engine.step(plan)
                out += [(u.stream_id, u.tokens, u.text_delta, u.is_final, u.frames_decoded, u.audio_seconds,
                         u.starts, u.ends) for u in result.updates]
                k += 1
        finally:
            for slot in slots:
                tiny_engine.release_slot(slot)

    by_rows, by_columns, by_flat = run("rows"), run("columns"), run("flat")
    assert any(row[1] for row in by_rows)  # the random-weight model emits tokens: the comparison is not vacuous
    assert by_columns == by_rows
    assert by_flat == by_rows


def test_the_engine_checks_a_flat_plan_as_a_row_plan(tiny_engine):
    g = tiny_engine.geometry
    slots = [tiny_engine.acquire_slot() for _ in range(2)]
    try:
        n = g.samples_needed(0)

        def plan(flat, lengths, ended=(False, False)):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            return StepPlan.from_columns(["a", "b"], np.array(slots), RowSamples(flat, offsets), np.ones(2, bool),
                                         np.array(ended), np.zeros(2, bool))

        with pytest.raises(BadChunkError, match="1-D float32") as err:
            tiny_engine.step(plan(np.zeros(2 * n, np.float64), [n, n]))
        assert err.value.stream_ids == ("a", "b")
        with pytest.raises(BadChunkError, match="b: empty chunk while the stream's audio continues") as err:
            tiny_engine.step(plan(np.zeros(n, np.float32), [n, 0]))
        assert err.value.stream_ids == ("b",)
        flat = np.zeros(2 * n, np.float32)
        flat[n + 3] = np.nan
        with pytest.raises(BadChunkError, match="NaN") as err:
            tiny_engine.step(plan(flat, [n, n]))
        assert err.value.stream_ids == ("b",)
    finally:
        for slot in slots:
            tiny_engine.release_slot(slot)
