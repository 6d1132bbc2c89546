"""trasmuon.layout without processes: which block each rank holds, what is refused, and the
pieces of an exchange (every block reaches its owner exactly once; every holder gets its
block of O back; sender and receiver agree on every split)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from trasmuon.layout import (
    Block,
    ExchangeEntry,
    ExchangePlan,
    block_view,
    matrix_layout,
    replicated_layout,
    row_sums_view,
    stack_layouts,
)
from trasmuon.plan import split_counts


def test_hsdp_blocks_repeat_per_replica_and_only_the_first_is_primary():
    layout = matrix_layout((7, 5), (2, 2), (Replicate(), Shard(0)), range(4), range(4))
    assert layout.blocks[0] == layout.blocks[2] == Block((0, 4), (0, 5))
    assert layout.blocks[1] == layout.blocks[3] == Block((4, 7), (0, 5))
    assert layout.primary == (True, True, False, False)


def test_in_out_orientation_swaps_the_block():
    layout = matrix_layout((5, 7), (2,), (Shard(0),), range(2), range(2), orientation="in_out")
    assert layout.shape == (7, 5)
    assert layout.blocks == (Block((0, 7), (0, 3)), Block((0, 7), (3, 5)))


def test_group_rank_order_follows_the_group():
    # The mesh lists ranks 2, 3, 0, 1; the group's rank r is global rank r.
    layout = matrix_layout((8, 3), (4,), (Shard(0),), [2, 3, 0, 1], range(4))
    assert [b.rows for b in layout.blocks] == [(4, 6), (6, 8), (0, 2), (2, 4)]


def test_refused_layouts():
    with pytest.raises(NotImplementedError, match="Partial"):
        matrix_layout((4, 4), (2,), (Partial(),), range(2), range(2))
    # A strided shard alone on a 1-D mesh interleaves rows: not a block.
    with pytest.raises(NotImplementedError, match="non-contiguous"):
        matrix_layout((8, 4), (2,), (_StridedShard(0, split_factor=2),), range(2), range(2))
    with pytest.raises(ValueError, match="ranks"):
        matrix_layout((8, 4), (2,), (Shard(0),), range(2), [0, 5])


@pytest.mark.parametrize("name,mesh,placements", [
    ("fsdp", (3,), (Shard(0),)),
    ("hsdp", (2, 2), (Replicate(), Shard(0))),
    ("fsdp+tp", (2, 2), (_StridedShard(0, split_factor=2), Shard(0))),
    ("tp rowwise under fsdp", (2, 2), (Shard(0), Shard(1))),
    ("replicated", None, None),
    ("stacks sharded inside their experts", (2, 2), (Shard(1), Shard(0))),
])
@pytest.mark.parametrize("row_sums", [0, 4])
def test_exchange_pieces(name, mesh, placements, row_sums):
    shapes = [(7, 10), (3, 12), (12, 5)]
    counts = [3, 1, 2]
    world = 3 if mesh is None else int(torch.tensor(mesh).prod())
    loads = [0.0] * world
    entries = []
    for shape, count in zip(shapes, counts, strict=True):
        stack = None
        if name.startswith("stacks"):  # `count` experts, each its own layout
            stack = stack_layouts((count, *shape), mesh, placements, range(world), range(world))
            layout = stack.matrices[0]
        elif mesh is None:
            layout = replicated_layout(shape, world)
        else:
            layout = matrix_layout(shape, mesh, placements, range(world), range(world))
        ranges = split_counts(count, world, loads, 1.0)
        owners = tuple(r for r, (a, b) in enumerate(ranges) for _ in range(a, b))
        entries.append(ExchangeEntry(layout, owners, 2, row_sums, stack.matrices if stack else ()))
    plan = ExchangePlan(entries, world)
    for e, entry in enumerate(entries):
        for i, owner in enumerate(entry.owners):
            layout = entry.layout_of(i)
            d_out, d_in = layout.shape
            # The owner gets every element of the matrix exactly once.
            covered = torch.zeros(d_out, d_in, dtype=torch.int64)
            for p in plan.inputs:
                if (p.entry, p.index) == (e, i):
                    assert p.dst == owner and layout.blocks[p.src] == p.block
                    covered[p.block.rows[0]:p.block.rows[1], p.block.cols[0]:p.block.cols[1]] += 1
            assert bool((covered == 1).all())
            # Every rank with a block gets it back from the owner.
            back = {p.dst: p.block for p in plan.outputs if (p.entry, p.index) == (e, i)}
            assert all(p_src == owner for p_src in
                       {p.src for p in plan.outputs if (p.entry, p.index) == (e, i)})
            for r, block in enumerate(layout.blocks):
                assert (back.get(r) == block) == bool(block.numel or (row_sums and block.shape[0]))
    for pieces in (plan.inputs, plan.outputs):
        sent, received = plan.totals(pieces)
        assert sum(sent) == sum(received)
        for r in range(world):
            send_sizes, mine = plan.parts(pieces, r, sending=True)
            assert sum(send_sizes) == sent[r] and sum(p.nbytes for p, _ in mine) == sent[r]
            for peer in range(world):
                recv_sizes, _ = plan.parts(pieces, peer, sending=False)
                assert recv_sizes[r] == send_sizes[peer]  # both sides agree on the split
            offsets = [o for _, o in mine]
            assert all(o % 16 == 0 for o in offsets)
    # What one rank plans is exactly the whole plan's pieces it sends or receives; whether
    # a direction moves anything is the whole plan's answer on every rank.
    for r in range(world):
        own = ExchangePlan(entries, world, rank=r)
        for whole, part in ((plan.inputs, own.inputs), (plan.outputs, own.outputs)):
            assert part == [p for p in whole if r in (p.src, p.dst)]
        assert own.moves_inputs == any(p.src != p.dst for p in plan.inputs)
        assert own.moves_outputs == any(p.src != p.dst for p in plan.outputs)


def test_stack_layouts():
    # FSDP2's Shard(0) and HSDP: whole experts, each where it lies (no exchange).
    assert stack_layouts((5, 4, 6), (2,), (Shard(0),), range(2), range(2)).whole_experts
    assert stack_layouts((5, 4, 6), (2, 2), (Replicate(), Shard(0)), range(4), range(4)).whole_experts
    # torchtitan's EP with FSDP2 when dp * ep > E: dim 1 over dp, experts over ep.
    stack = stack_layouts((5, 4, 6), (2, 2), (Shard(1), Shard(0)), range(4), range(4))
    assert not stack.whole_experts
    assert stack.experts == ((0, 3), (3, 5), (0, 3), (3, 5))
    expert4 = stack.matrices[4]
    empty = Block((0, 0), (0, 0))
    assert expert4.blocks == (empty, Block((0, 2), (0, 6)), empty, Block((2, 4), (0, 6)))
    assert expert4.primary == (False, True, False, True)
    # (E, in, out) stored: the sharded dim 1 is the matrix's columns.
    stack = stack_layouts((5, 6, 4), (2, 2), (Shard(1), Shard(0)), range(4), range(4), "in_out")
    assert stack.matrices[0].shape == (4, 6)
    assert stack.matrices[0].blocks[0] == Block((0, 4), (0, 3))
    with pytest.raises(NotImplementedError, match="Partial"):
        stack_layouts((4, 4, 4), (2,), (Partial(),), range(2), range(2))


def test_block_and_row_sums_views_share_a_piece_without_overlap():
    data = torch.zeros(64, dtype=torch.uint8)
    block = block_view(data, torch.bfloat16, (3, 5))
    sums = row_sums_view(data, torch.bfloat16, (3, 5), torch.float32)
    block.fill_(1.0)
    sums.fill_(2.0)
    assert bool((block == 1.0).all()) and sums.tolist() == [2.0] * 3
    assert sums.data_ptr() - data.data_ptr() == 32  # 30 bytes of block, padded to 16
    assert block_view(data, torch.bfloat16, (3, 5), transposed=True).shape == (3, 5)
