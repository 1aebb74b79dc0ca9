"""The MoM mixer's dispatch plan: slots grouped by (sequence, memory) segment in time order, both layouts,
packed documents, the shared slot, the row tables of the Triton path."""
from __future__ import annotations

import pytest
import torch

from memmix.ops.mom import add_shared_slot, plan_dispatch


def _random_plan(B: int, T: int, S: int, P: int, layout: str = "packed", keep: float = 0.8):
    """(memory_ids (B, T, S) distinct picks among P, valid (B, T) with about `keep` real tokens, their plan)."""
    ids = torch.stack([torch.randperm(P)[:S] for _ in range(B * T)]).view(B, T, S)
    valid = torch.rand(B, T) < keep
    return ids, valid, plan_dispatch(ids, valid, P, layout=layout)


@pytest.mark.parametrize("layout", ["packed", "dense"])
def test_plan_groups_slots_by_segment_in_time_order(layout):
    B, T, S, P = 3, 11, 2, 5
    ids, valid, plan = _random_plan(B, T, S, P, layout)
    payload = torch.arange(B * T * S, dtype=torch.float64).view(B, T, S, 1)
    buf = plan.dispatch(payload)[:, 0]
    for b in range(B):
        for m in range(P):
            seg = b * P + m
            want = [payload[b, t, s, 0].item() for t in range(T) for s in range(S) if valid[b, t] and ids[b, t, s] == m]
            start = plan.starts[seg].item()
            assert plan.counts[seg].item() == len(want)
            assert buf[start : start + len(want)].tolist() == want
    back = plan.collect(plan.dispatch(payload))
    torch.testing.assert_close(back, payload * valid.view(B, T, 1, 1))


def test_plan_with_documents_restarts_each_segment():
    T, S, P = 12, 1, 2
    ids = torch.tensor([0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0]).view(1, T, S)
    cu = torch.tensor([0, 4, 4, 9, 12])
    plan = plan_dispatch(ids, torch.ones(1, T, dtype=torch.bool), P, cu_seqlens=cu)
    counts = plan.counts.view(4, P)
    for d in range(4):
        seg_ids = ids[0, cu[d] : cu[d + 1], 0]
        assert counts[d].tolist() == [int((seg_ids == m).sum()) for m in range(P)]
    # token order inside (document, memory) segments follows time
    buf = plan.dispatch(torch.arange(T, dtype=torch.float64).view(1, T, 1, 1))[:, 0]
    assert buf[plan.starts[4] : plan.starts[5]].tolist() == [6.0, 8.0]  # document 2 (t = 4..8), memory 0


def test_shared_slot_is_memory_M_with_weight_one():
    ids, weights = torch.tensor([[[2, 0], [1, 3]]]), torch.tensor([[[0.75, 0.25], [0.5, 0.5]]])
    slots, slot_weights = add_shared_slot(ids, weights, 4, True)
    assert slots.tolist() == [[[2, 0, 4], [1, 3, 4]]]
    assert slot_weights.tolist() == [[[0.75, 0.25, 1.0], [0.5, 0.5, 1.0]]]
    same = add_shared_slot(ids, weights, 4, False)
    assert same[0] is ids and same[1] is weights


@pytest.mark.parametrize("layout", ["packed", "dense"])
def test_filled_rows_are_the_valid_slots(layout):
    B, T, S, P = 2, 9, 3, 4
    ids, valid, plan = _random_plan(B, T, S, P, layout, keep=0.7)
    filled = plan.filled_rows()
    assert filled.shape == (plan.buffer_len,) and filled.sum() == valid.sum() * S
    assert filled[plan.dest[valid.unsqueeze(-1).expand(B, T, S).reshape(-1)]].all()


def test_segment_rows_invert_the_plan():
    """Row tables of the packed layout: every row is exactly one slot; its token, memory, segment and position."""
    B, T, S, P = 2, 7, 2, 3
    ids, valid, plan = _random_plan(B, T, S, P, keep=0.6)
    rows = plan.segment_rows(ids)
    assert rows.num_rows == B * T * S and rows.num_segments == B * P
    for slot in range(B * T * S):
        b, t, s = slot // (T * S), slot // S % T, slot % S
        row = plan.dest[slot]
        assert rows.slot_row[b * T + t, s] == row
        assert rows.row_token[row] == b * T + t and rows.row_memory[row] == ids[b, t, s]
        if valid[b, t]:
            segment = b * P + ids[b, t, s]
            assert rows.row_segment[row] == segment and rows.row_position[row] == row - plan.starts[segment]
        else:
            assert rows.row_segment[row] == B * P  # the trash area
    with pytest.raises(ValueError, match="segment_rows needs the 'packed' layout"):
        plan_dispatch(ids, valid, P, layout="dense").segment_rows(ids)


def test_plan_checks_its_layout():
    ids, valid = torch.zeros(1, 3, 1, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="layout must be one of"):
        plan_dispatch(ids, valid, 2, layout="ragged")
    with pytest.raises(ValueError, match="layout='dense' does not take cu_seqlens"):
        plan_dispatch(ids, valid, 2, cu_seqlens=torch.tensor([0, 3]), layout="dense")
