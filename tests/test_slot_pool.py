"""The slot pool's ring state (engines/slot_pool.py, StateSpec.ring_shift) against the same pool
keeping whole windows: random batches of slots in random order, first chunks (restart) mixed in,
must gather the same windows after every commit, and a commit must write only the new frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.slot_pool import SlotPool, StateSpec

L, C, F, CAP = 3, 7, 5, 9


def _pools(shift: int):
    ring = SlotPool([StateSpec("cc", (L, C, F), 1, torch.float32, ring_shift=shift),
                     StateSpec("h", (4,), 0, torch.float32)], CAP, torch.device("cpu"))
    whole = SlotPool([StateSpec("cc", (L, C, F), 1, torch.float32),
                      StateSpec("h", (4,), 0, torch.float32)], CAP, torch.device("cpu"))
    return ring, whole


def _step(gathered: dict, shift: int, gen: torch.Generator) -> dict:
    """What an encoder step does to the window: drop the oldest `shift` frames, append new ones."""
    cc = gathered["cc"]
    new = torch.randn(L, cc.shape[1], shift, F, generator=gen)
    return {"cc": torch.cat([cc[:, :, shift:], new], dim=2), "h": torch.randn(cc.shape[1], 4, generator=gen)}


@pytest.mark.parametrize("new_only", [False, True])
@pytest.mark.parametrize("shift", [1, 2, 7])
def test_ring_gathers_what_whole_windows_gather(shift, new_only):
    """new_only: the ring is handed the step's new frames alone (an encoder that reads the ring
    in place keeps no window), the whole-window pool the window: a restarted row's older frames
    must come out empty all the same."""
    ring, whole = _pools(shift)
    rng = np.random.default_rng(shift)
    gen = torch.Generator().manual_seed(shift)
    started = np.zeros(CAP, dtype=bool)
    for _ in range(60):
        n = int(rng.integers(1, CAP + 1))
        slots = rng.permutation(CAP)[:n]
        # a slot's first chunk, or a reused slot's new stream: its old frames must not show
        restart = ~started[slots] | (rng.random(n) < 0.1)
        started[slots] = True
        idx = torch.as_tensor(slots, dtype=torch.long)
        got, ref = ring.gather(idx, restart), whole.gather(idx, restart)
        for name in ref:
            assert torch.equal(got[name], ref[name]), name
        nxt = _step(ref, shift, gen)
        ring.commit(idx, ring.stage({**nxt, "cc": nxt["cc"][:, :, C - shift:]} if new_only else nxt, restart=restart))
        whole.commit(idx, whole.stage(nxt, restart=restart))
    every = torch.arange(CAP)
    assert torch.equal(ring.gather(every)["cc"], whole.gather(every)["cc"])
    if shift < C:  # a shift of the whole window brings every head back to 0
        assert int(ring.heads["cc"].max()) > 0, "the heads never moved: the ring was not exercised"


def test_commit_writes_only_the_new_frames():
    shift = 2
    ring, _ = _pools(shift)
    idx = torch.tensor([4])
    first = {"cc": torch.ones(L, 1, C, F), "h": torch.zeros(1, 4)}
    ring.commit(idx, ring.stage(first, restart=np.array([True])))
    before = ring.tensors["cc"].clone()
    nxt = {"cc": torch.cat([first["cc"][:, :, shift:], torch.full((L, 1, shift, F), 5.0)], dim=2),
           "h": torch.zeros(1, 4)}
    ring.commit(idx, ring.stage(nxt, restart=np.array([False])))
    changed = (ring.tensors["cc"] != before).any(dim=-1)  # [L, CAP, C]
    assert changed[:, 4].sum(dim=-1).tolist() == [shift] * L   # two frames per layer, no more
    assert not changed[:, :4].any() and not changed[:, 5:].any()
    assert torch.equal(ring.gather(idx)["cc"], nxt["cc"])


def test_a_ring_value_must_hold_the_new_frames():
    ring, _ = _pools(3)
    with pytest.raises(ValueError, match="neither the ring's 7 nor its 3 new"):
        ring.stage({"cc": torch.zeros(L, 1, 2, F), "h": torch.zeros(1, 4)})


def test_a_ring_needs_room_for_its_shift():
    with pytest.raises(ValueError, match="ring of 7 frames"):
        SlotPool([StateSpec("cc", (L, C, F), 1, torch.float32, ring_shift=C + 1)], CAP, torch.device("cpu"))


def test_a_skipped_state_is_not_gathered_and_the_others_are():
    """An engine that reads the attention cache in the pool itself (engines/step_attention.py)
    has the pool leave that state out of the gather; every other state still comes, fresh rows
    zeroed."""
    ring, _ = _pools(2)
    for name, t in ring.tensors.items():
        t.copy_(torch.randn(t.shape))
    index = torch.tensor([3, 0])
    full = ring.gather(index, np.array([False, True]))
    part = ring.gather(index, np.array([False, True]), skip=("cc",))
    assert "cc" not in part and set(part) == set(full) - {"cc"}
    for name in part:
        assert torch.equal(part[name], full[name]), name
    assert part["h"][1].count_nonzero() == 0 and part["h"][0].count_nonzero() > 0  # the fresh row: zeroed
