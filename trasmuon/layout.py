"""Which block of each matrix every rank holds, and who sends what to whom around
Newton–Schulz: pure functions of shapes, placements and rank lists (no communication), so that
every rank computes the same answer, and a benchmark can plan a step for 512 ranks in one
process (see docs/distributed.md).

A DTensor parameter on any mesh with ``Replicate``, ``Shard`` and ``_StridedShard`` placements
(FSDP2, HSDP, tensor parallelism, FSDP2 over TP) gives each rank a rectangular block of the
global matrix: a contiguous range of rows times a contiguous range of columns. The blocks are
computed with torch's own split functions applied to index vectors, one tensor dim at a time,
so they are what DTensor itself does, uneven shards included. A rank's block is the (out, in)
matrix's: for ``orientation="in_out"`` the parameter's dims are swapped first.

Around Newton–Schulz, every matrix has one owner (a rank of the exchange group). The owner
receives each distinct block once (from the holder nearest to it, itself when it holds it),
orthogonalizes the whole matrix, and sends every holder its block of O, with O's row sums of
squares for those rows when the rule needs them. :class:`ExchangePlan` lays out those pieces in
the byte buffers of one all-to-all per direction.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Block",
    "ExchangePlan",
    "MatrixLayout",
    "Piece",
    "StackLayout",
    "block_view",
    "dtensor_ranges",
    "matrix_layout",
    "replicated_layout",
    "row_sums_view",
    "stack_layouts",
]

Range = tuple[int, int]
ALIGN = 16  # bytes: every piece of an exchange buffer starts at a multiple (any dtype view)


@dataclass(frozen=True)
class Block:
    """Rows [r0, r1) and columns [c0, c1) of an (out, in) matrix."""

    rows: Range
    cols: Range

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0])

    @property
    def numel(self) -> int:
        r, c = self.shape
        return r * c


def _placement_kind(placement: object) -> str:
    name = type(placement).__name__
    if name == "Replicate":
        return "replicate"
    if name == "_StridedShard":
        return "strided"
    if name == "Shard":
        return "shard"
    return name  # Partial & co.: refused by the caller


@functools.lru_cache(maxsize=4096)
def _dim_ranges(size: int, mesh_shape: tuple[int, ...], placements: tuple, dim: int) -> tuple[Range, ...]:
    """Per mesh coordinate (row-major over ``mesh_shape``), the contiguous range of indices of
    tensor dim ``dim`` (of length ``size``) that the coordinate holds."""
    from torch.distributed.tensor import Shard

    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - older torch
        _StridedShard = None
    steps = []
    for mesh_dim, placement in enumerate(placements):
        if _placement_kind(placement) in ("shard", "strided") and placement.dim == dim:
            if _placement_kind(placement) == "strided":
                one_d = _StridedShard(0, split_factor=placement.split_factor)
            else:
                one_d = Shard(0)
            steps.append((mesh_dim, one_d))
    out = []
    for coordinate in itertools.product(*(range(n) for n in mesh_shape)):
        index = torch.arange(size)
        for mesh_dim, one_d in steps:
            pieces, _ = one_d._split_tensor(index, mesh_shape[mesh_dim], with_padding=False)
            index = pieces[coordinate[mesh_dim]] if coordinate[mesh_dim] < len(pieces) else index[:0]
        n = index.numel()
        start = int(index[0]) if n else 0
        if n and not torch.equal(index, torch.arange(start, start + n)):
            raise NotImplementedError(
                f"placements {placements} on a mesh of shape {mesh_shape} give mesh coordinate "
                f"{coordinate} a non-contiguous set of indices of dim {dim}; the matrix rules "
                "take layouts whose shards are contiguous blocks (FSDP2, HSDP, TP and FSDP2+TP)")
        out.append((start, start + n))
    return tuple(out)


def dtensor_ranges(shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[object]
                   ) -> list[tuple[Range, ...]]:
    """Per mesh coordinate (row-major), the index range of every dim of a tensor of global
    ``shape`` distributed with ``placements``. Raises NotImplementedError for a placement that
    is not Replicate, Shard or _StridedShard, or a shard that is not contiguous."""
    placements = tuple(placements)
    for placement in placements:
        if _placement_kind(placement) not in ("replicate", "shard", "strided"):
            raise NotImplementedError(
                f"placement {type(placement).__name__} ({placement}) is not supported by the "
                "matrix rules (Replicate, Shard "
                "and _StridedShard are); redistribute the parameter or put it on AdamW")
    per_dim = [_dim_ranges(int(n), tuple(int(m) for m in mesh_shape), placements, d)
               for d, n in enumerate(shape)]
    return [tuple(ranges[i] for ranges in per_dim) for i in range(len(per_dim[0]))]


@dataclass(frozen=True)
class MatrixLayout:
    """The blocks of one (d_out, d_in) matrix over the ranks of its exchange group (indexed by
    group rank). ``primary[r]``: rank r is the first holder of its block, the one whose partial
    sums count in the all-reduce of sums over rows (a replica's are masked out)."""

    shape: tuple[int, int]
    blocks: tuple[Block, ...]
    primary: tuple[bool, ...]

    @property
    def world(self) -> int:
        return len(self.blocks)

    @property
    def whole_everywhere(self) -> bool:
        """Every rank holds the whole matrix (replicated)."""
        full = Block((0, self.shape[0]), (0, self.shape[1]))
        return all(b == full for b in self.blocks)

    def distinct(self) -> list[tuple[Block, list[int]]]:
        """Each non-empty distinct block with its holders (ranks in order)."""
        holders: dict[Block, list[int]] = {}
        for r, b in enumerate(self.blocks):
            if b.numel:
                holders.setdefault(b, []).append(r)
        return list(holders.items())

    def source(self, block: Block, holders: list[int], owner: int) -> int:
        """The holder that sends ``block`` to ``owner``: the owner itself when it holds it,
        else the holder of the nearest rank (in HSDP: the owner's own replica group)."""
        if owner in holders:
            return owner
        return min(holders, key=lambda r: (abs(r - owner), r))


def _check_tiling(shape: tuple[int, int], blocks: Sequence[Block], what: str) -> None:
    """The distinct blocks must cover the matrix exactly once (a grid of row and column
    ranges), or sums over the primaries would miss or repeat entries."""
    distinct = {b for b in blocks if b.numel}
    rows = sorted({b.rows for b in distinct})
    cols = sorted({b.cols for b in distinct})
    grid = {Block(r, c) for r in rows for c in cols}
    covered = sum(b.numel for b in distinct)
    if distinct != grid or covered != shape[0] * shape[1]:
        raise NotImplementedError(f"{what}: the shards do not tile the matrix as a grid of blocks")


def matrix_layout(param_shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[object],
                  mesh_ranks: Sequence[int], group_ranks: Sequence[int], orientation: str = "out_in",
                  flatten: bool = False) -> MatrixLayout:
    """The layout of a 2-D DTensor parameter of global ``param_shape`` over the exchange group
    (or, with ``flatten``, of an (out, in, *kernel) one as the (out, in * prod(kernel))
    matrix: its dims after the first must not be sharded). ``mesh_ranks``: the global ranks
    of the mesh, row-major; ``group_ranks``: the global ranks of the exchange group in
    group-rank order (the same set)."""
    if sorted(mesh_ranks) != sorted(group_ranks):
        raise ValueError(f"the mesh's ranks {sorted(mesh_ranks)} are not the exchange group's "
                         f"ranks {sorted(group_ranks)}")
    shape = tuple(int(n) for n in param_shape)
    per_coordinate = dtensor_ranges(shape, mesh_shape, placements)
    if len(shape) > 2:
        if not flatten:
            raise NotImplementedError(f"a {len(shape)}-D parameter needs flatten=True")
        if any(r != (0, n) for ranges in per_coordinate for r, n in zip(ranges[1:], shape[1:], strict=True)):
            raise NotImplementedError(
                f"placements {tuple(placements)} shard a dim after the first of a flattened "
                f"{len(shape)}-D parameter; flatten=True takes shards of dim 0 only")
        cols = (0, math.prod(shape[1:]))
        per_coordinate = [(ranges[0], cols) for ranges in per_coordinate]
        shape = (shape[0], cols[1])
    by_global = dict(zip(mesh_ranks, per_coordinate, strict=True))
    blocks = []
    for g in group_ranks:
        first, second = by_global[g]
        blocks.append(Block(second, first) if orientation == "in_out" else Block(first, second))
    shape = (shape[1], shape[0]) if orientation == "in_out" else (shape[0], shape[1])
    return _grid_layout(shape, blocks, f"placements {tuple(placements)}")


def _grid_layout(shape: tuple[int, int], blocks: Sequence[Block], what: str) -> MatrixLayout:
    """The layout of ``blocks`` (per group rank), checked to tile the matrix as a grid; the
    first holder of each block is its primary."""
    _check_tiling(shape, blocks, what)
    seen: set[Block] = set()
    primary = []
    for b in blocks:
        primary.append(b.numel > 0 and b not in seen)
        seen.add(b)
    return MatrixLayout(shape, tuple(blocks), tuple(primary))


@dataclass(frozen=True)
class StackLayout:
    """The layouts of the E matrices of an (E, out, in) expert stack over the exchange group:
    ``experts[r]``, the range of experts group rank r holds; ``matrices[e]``, expert e's
    layout (the blocks of its holders; an empty block on every other rank)."""

    experts: tuple[Range, ...]
    matrices: tuple[MatrixLayout, ...]

    @property
    def whole_experts(self) -> bool:
        """Every rank holds each of its experts whole (sharded over experts only): no
        exchange, each rank orthogonalizes its own."""
        return all(b.numel in (0, layout.shape[0] * layout.shape[1])
                   for layout in self.matrices for b in layout.blocks)


def stack_layouts(param_shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[object],
                  mesh_ranks: Sequence[int], group_ranks: Sequence[int], orientation: str = "out_in"
                  ) -> StackLayout:
    """The layout of each expert of a 3-D DTensor stack of global ``param_shape`` (E, out, in)
    (or (E, in, out) with ``orientation="in_out"``). Sharded on the expert dim only, each rank
    holds whole experts; sharded inside the matrices too (torchtitan's EP with FSDP2 when
    dp * ep exceeds E: ``(Shard(1), Shard(0))``), an expert's matrix spans the ranks of its
    expert shard, in blocks that must tile it as a grid."""
    if sorted(mesh_ranks) != sorted(group_ranks):
        raise ValueError(f"the mesh's ranks {sorted(mesh_ranks)} are not the exchange group's "
                         f"ranks {sorted(group_ranks)}")
    shape = tuple(int(n) for n in param_shape)
    by_global = dict(zip(mesh_ranks, dtensor_ranges(shape, mesh_shape, placements), strict=True))
    per_rank = [by_global[g] for g in group_ranks]
    d_out, d_in = (shape[2], shape[1]) if orientation == "in_out" else (shape[1], shape[2])
    empty = Block((0, 0), (0, 0))
    matrices = []
    for e in range(shape[0]):
        blocks = []
        for experts, first, second in per_rank:
            if not experts[0] <= e < experts[1]:
                blocks.append(empty)
            else:
                blocks.append(Block(second, first) if orientation == "in_out" else Block(first, second))
        matrices.append(_grid_layout((d_out, d_in), blocks, f"placements {tuple(placements)} (expert {e})"))
    return StackLayout(tuple(experts for experts, _, _ in per_rank), tuple(matrices))


def replicated_layout(shape: Sequence[int], world: int) -> MatrixLayout:
    """Every rank holds the whole (d_out, d_in) matrix (DDP)."""
    full = Block((0, int(shape[0])), (0, int(shape[1])))
    return MatrixLayout((int(shape[0]), int(shape[1])), (full,) * world,
                        (True,) + (False,) * (world - 1))


# --------------------------------------------------------------------------------------
# The exchange of one step
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """One block of matrix ``index`` of entry ``entry`` (a bucket) moving from ``src`` to
    ``dst``: ``nbytes`` in the buffers, padded to ``ALIGN`` (an output piece also carries O's
    row sums of squares for the block's rows, after the block, when the rule needs them)."""

    entry: int
    index: int
    block: Block
    src: int
    dst: int
    nbytes: int = 0


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class ExchangeEntry:
    """What the planner needs of one bucket: its layout, how many matrices, the owner of each,
    the element size of Newton–Schulz's input and output, and of O's row sums (0: not sent)."""

    layout: MatrixLayout
    owners: tuple[int, ...]
    itemsize: int
    row_sum_itemsize: int = 0
    # An expert stack sharded inside its experts: each matrix's own layout (``layout`` is then
    # unused); empty: every matrix has ``layout``.
    per_matrix: tuple[MatrixLayout, ...] = ()

    def layout_of(self, i: int) -> MatrixLayout:
        return self.per_matrix[i] if self.per_matrix else self.layout


class ExchangePlan:
    """The pieces of one step's two all-to-alls over a group of ``world`` ranks, and where
    each lies in the send and receive buffers of every rank (a buffer holds, per peer in rank
    order, that peer's pieces in entry, matrix and block order, each ``ALIGN``-aligned)."""

    def __init__(self, entries: Sequence[ExchangeEntry], world: int, rank: int | None = None) -> None:
        """``rank``: keep only the pieces that rank sends or receives (what a rank needs at
        run time: the whole plan grows as matrices times ranks); None: every piece."""
        self.entries = list(entries)
        self.world = world
        inputs, outputs = [], []
        distinct_of: dict[int, list[tuple[Block, list[int]]]] = {}  # id(layout) -> its blocks
        for e, entry in enumerate(self.entries):
            for i, owner in enumerate(entry.owners):
                layout = entry.layout_of(i)
                distinct = distinct_of.get(id(layout))
                if distinct is None:
                    distinct = distinct_of[id(layout)] = layout.distinct()
                mine = None if rank is None else layout.blocks[rank]
                if rank is None or owner == rank:
                    for block, holders in distinct:
                        inputs.append(Piece(e, i, block, layout.source(block, holders, owner), owner))
                elif mine.numel:
                    holders = next(h for block, h in distinct if block == mine)
                    if layout.source(mine, holders, owner) == rank:
                        inputs.append(Piece(e, i, mine, rank, owner))
                targets = range(world) if rank is None or owner == rank else (rank,)
                for r in targets:
                    block = layout.blocks[r]
                    # A block of rows without columns still takes its rows' sums of squares:
                    # its per-row state is kept like every other holder's of those rows.
                    if block.numel or (entry.row_sum_itemsize and block.shape[0]):
                        outputs.append(Piece(e, i, block, owner, r))
        # Whether each all-to-all moves anything on any rank: a fact of the whole plan, which
        # every rank must agree on (a rank that skipped a collective the others call would
        # hang them), so it is not read off a rank's own pieces.
        self.moves_inputs = self.moves_outputs = False
        for entry in self.entries:
            pairs = {(owner, id(entry.layout_of(i))): (owner, entry.layout_of(i))
                     for i, owner in enumerate(entry.owners)}
            for owner, layout in pairs.values():
                full = Block((0, layout.shape[0]), (0, layout.shape[1]))
                self.moves_inputs |= layout.blocks[owner] != full
                self.moves_outputs |= any(
                    r != owner for r, b in enumerate(layout.blocks)
                    if b.numel or (entry.row_sum_itemsize and b.shape[0]))
        self.inputs = [self._sized(p, row_sums=False) for p in inputs]
        self.outputs = [self._sized(p, row_sums=True) for p in outputs]

    def _sized(self, piece: Piece, row_sums: bool) -> Piece:
        entry = self.entries[piece.entry]
        n = piece.block.numel * entry.itemsize
        if row_sums and entry.row_sum_itemsize:
            n = _aligned(n) + piece.block.shape[0] * entry.row_sum_itemsize
        return Piece(piece.entry, piece.index, piece.block, piece.src, piece.dst, _aligned(n))

    def parts(self, pieces: list[Piece], rank: int, sending: bool
              ) -> tuple[list[int], list[tuple[Piece, int]]]:
        """For ``rank``: the byte size of its part for every peer (the split sizes of the
        all-to-all; its own part is 0, kept local) and its pieces with their byte offsets in
        its buffer. Sender and receiver list a (src, dst) pair's pieces in the same order."""
        by_peer: list[list[Piece]] = [[] for _ in range(self.world)]
        for p in pieces:
            if p.src == p.dst:
                continue
            if sending and p.src == rank:
                by_peer[p.dst].append(p)
            elif not sending and p.dst == rank:
                by_peer[p.src].append(p)
        sizes, mine, offset = [], [], 0
        for peer_pieces in by_peer:
            for p in peer_pieces:
                mine.append((p, offset))
                offset += p.nbytes
            sizes.append(sum(p.nbytes for p in peer_pieces))
        return sizes, mine

    def local(self, pieces: list[Piece], rank: int) -> list[Piece]:
        """The pieces a rank keeps (it is both sender and receiver)."""
        return [p for p in pieces if p.src == rank and p.dst == rank]

    def totals(self, pieces: list[Piece]) -> tuple[list[int], list[int]]:
        """Bytes each rank sends and receives (its own pieces excluded)."""
        sent, received = [0] * self.world, [0] * self.world
        for p in pieces:
            if p.src != p.dst:
                sent[p.src] += p.nbytes
                received[p.dst] += p.nbytes
        return sent, received


def block_view(data: torch.Tensor, dtype: torch.dtype, shape: tuple[int, int],
               transposed: bool = False) -> torch.Tensor:
    """A piece's block, as a (rows, cols) tensor of ``dtype`` over the start of its bytes
    (``transposed``: stored column by column, as a tall matrix's eager O is)."""
    rows, cols = shape
    flat = data[:rows * cols * dtype.itemsize].view(dtype)
    return flat.view(cols, rows).mT if transposed else flat.view(rows, cols)


def row_sums_view(data: torch.Tensor, block_dtype: torch.dtype, shape: tuple[int, int],
                  dtype: torch.dtype) -> torch.Tensor:
    """The row sums of squares an output piece carries after its block."""
    rows, cols = shape
    start = _aligned(rows * cols * block_dtype.itemsize)
    return data[start:start + rows * dtype.itemsize].view(dtype)
