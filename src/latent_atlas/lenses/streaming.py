"""Row statistics of a lens's logits, streamed over blocks of the vocabulary (an online log-sum-exp).

A lens with a :class:`~latent_atlas.lenses.base.Readout` has its logits for a chunk of tokens computed ``width``
vocabulary columns at a time into one reused buffer, small enough to stay in cache, and never held whole. Each
block gives, per row: its maximum ``m_b`` (and its arg-max where it beats the earlier blocks),
``S_b = sum exp(z - m_b)``, ``T_b = sum exp(z - m_b)(z - m_b)``, ``C_b = sum q (z - m_b)`` for a reference
distribution q, the logits at given tokens, and the number of logits above a threshold. Merged at the end with
``m = max_b m_b``: ``log sum exp(z - m) = log sum_b e^(m_b - m) S_b``, and so on (:func:`row_stats`). Shifting
each block by its own maximum keeps every sum as precise as one shift by the row's maximum, or more (the sums
are of terms <= 1, and of ``z - m_b`` near each block's top).

Threads. A block's product uses the caller's intra-op threads; its passes (~1 M elements each, in cache, well
under a millisecond on one core) run on one thread (:func:`single_threaded`). Split across threads, each pass is
a parallel region that waits for every thread, and where the cores are shared (two jobs of a run, a background
job) a descheduled thread made each one take ~8 ms instead of 0.05-0.9 ms, a dozen of them per block.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from latent_atlas.lenses.base import Lens, Readout

DEFAULT_WIDTH = 4096  # vocabulary columns per block: 256 rows x 4096 float32 = 4 MiB, within a last-level cache


@dataclass(frozen=True)
class RowStats:
    """Per-row statistics of logits ``z`` over the whole vocabulary, for ``n`` rows; ``m`` is the row maximum.

    Attributes:
        top: ``m``.
        top1: the arg-max (the first on ties).
        log_total: ``log sum_v exp(z_v - m)``, so ``log p = z - m - log_total``.
        total: ``sum_v exp(z_v - m)``.
        weighted: ``sum_v exp(z_v - m)(z_v - m)``: the entropy is ``log_total - weighted / total``.
        cross: ``sum_v q_v (z_v - m)`` for the reference distribution q (None without one).
        at_next: ``z`` at the next token (NaN where none is given).
        above: how many logits exceed the threshold (the logit of the reference's top-1; None without one).
    """

    top: torch.Tensor
    top1: torch.Tensor
    log_total: torch.Tensor
    total: torch.Tensor
    weighted: torch.Tensor
    cross: torch.Tensor | None
    at_next: torch.Tensor
    above: torch.Tensor | None


@dataclass(frozen=True)
class Reference:
    """A distribution q over the vocabulary for the same rows, in the blocks' layout: ``q = cat(blocks, 1)``."""

    blocks: list[torch.Tensor]
    masses: torch.Tensor  # (n, number of blocks): each block's row sums of q


class Blocks:
    """One chunk of tokens' logits under one lens, ``width`` vocabulary columns at a time.

    Built from the lens's :class:`~latent_atlas.lenses.base.Readout` and hidden vectors (each block computed
    into one reused buffer, which :func:`row_stats` may overwrite), or, for a lens without one, from its
    materialised logits (each block a view, left as it is).
    """

    def __init__(
        self,
        readout: Readout | None,
        hidden: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        width: int = DEFAULT_WIDTH,
    ) -> None:
        """Give either ``readout`` and ``hidden`` ``(n, d)``, or ``logits`` ``(n, V)``."""
        if (readout is None) == (logits is None):
            raise ValueError("give either a readout with hidden vectors or materialised logits")
        if width < 1:
            raise ValueError(f"the block width must be positive, got {width}")
        self.readout, self.hidden, self.full = readout, hidden, logits
        self.rows = len(hidden) if readout is not None else logits.shape[0]
        self.vocab_size = readout.vocab_size if readout is not None else logits.shape[1]
        self.width = min(width, self.vocab_size)
        self.overwritable = readout is not None
        self._buffer = torch.empty(self.rows * self.width) if readout is not None else None

    @classmethod
    def of(cls, lens: Lens, states: torch.Tensor, layer: int, width: int = DEFAULT_WIDTH) -> "Blocks":
        """A lens's blocks for states ``(n, d)`` at ``layer``: through its readout when it has one."""
        readout = lens.readout(layer)
        if readout is None:
            return cls(None, logits=lens.logits(states, layer).float(), width=width)
        return cls(readout, lens.hidden(states, layer).float(), width=width)

    @property
    def starts(self) -> range:
        """The first column of each block."""
        return range(0, self.vocab_size, self.width)

    def block(self, start: int, keep: bool = False) -> torch.Tensor:
        """Columns ``start:start + width``, ``(n, width)`` (in the shared buffer unless ``keep``)."""
        stop = min(start + self.width, self.vocab_size)
        if self.readout is None:
            return self.full[:, start:stop]
        out = None if keep else self._buffer[: self.rows * (stop - start)].view(self.rows, stop - start)
        return self.readout.logits(self.hidden, start, stop, out=out)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, block)`` in vocabulary order."""
        return ((start, self.block(start)) for start in self.starts)

    def at(self, ids: torch.Tensor) -> torch.Tensor:
        """The logit of token ``ids[i]`` in row i, ``(n,)``, as the blocks compute it (:func:`row_stats` checks)."""
        if self.readout is None:
            return self.full.gather(1, ids[:, None]).squeeze(1)
        return self.readout.logits_at(self.hidden, ids)

    def rows_of(self, rows: torch.Tensor) -> torch.Tensor:
        """All logits of some rows, ``(len(rows), V)``."""
        return self.readout.logits(self.hidden[rows]) if self.readout is not None else self.full[rows]

    def kept(self) -> "KeptBlocks":
        """These logits computed once, block by block, and kept (``(n, V)`` in all) for repeated passes."""
        return KeptBlocks([self.block(start, keep=True) for start in self.starts], self.width)


class KeptBlocks:
    """Logits held as blocks of ``width`` columns (each its own tensor); passes over them leave them as they are."""

    overwritable = False

    def __init__(self, blocks: list[torch.Tensor], width: int) -> None:
        self.blocks, self.width = blocks, width
        self.rows, self.vocab_size = blocks[0].shape[0], sum(block.shape[1] for block in blocks)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, block)`` in vocabulary order."""
        return zip(range(0, self.vocab_size, self.width), self.blocks, strict=True)

    def at(self, ids: torch.Tensor) -> torch.Tensor:
        """The logit of token ``ids[i]`` in row i, ``(n,)``."""
        values = torch.full((self.rows,), float("nan"))
        for start, block in self:
            _gather_into(values, block, start, ids)
        return values

    def rows_of(self, rows: torch.Tensor) -> torch.Tensor:
        """All logits of some rows, ``(len(rows), V)``."""
        return torch.cat([block[rows] for block in self.blocks], 1)


def row_stats(
    blocks: Blocks | KeptBlocks,
    reference: Reference | None = None,
    next_ids: torch.Tensor | None = None,
    rank_ids: torch.Tensor | None = None,
) -> RowStats:
    """Stream the blocks once: the per-row statistics of :class:`RowStats`.

    Args:
        blocks: the logits, block by block.
        reference: q for ``cross``, in blocks of the same width.
        next_ids: ``(n,)`` tokens whose logit ``at_next`` keeps (-1: none).
        rank_ids: ``(n,)`` tokens whose logit is the threshold of ``above`` (so ``above`` is that token's rank,
            0 = top, ties not counted). The threshold comes from :meth:`Blocks.at`; rows where it differs from
            the token's logit in its block are recounted on their full logits.
    """
    n = blocks.rows
    threshold = blocks.at(rank_ids)[:, None] if rank_ids is not None else None
    scratch = _Scratch.for_blocks(n, blocks.width)
    at_next, at_rank = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    above = torch.zeros(n) if threshold is not None else None
    leader = _Leader(n)
    maxima, totals, weighted, crosses = [], [], [], []
    for index, (start, z) in enumerate(blocks):  # the block's product: the caller's threads
        with single_threaded():  # its passes: one thread (module docstring)
            top = z.amax(1)
            leader.update(z, top, start)
            if threshold is not None:
                above += torch.gt(z, threshold, out=scratch.exp(z)).sum(1)  # a float mask sums far faster than bool
                _gather_into(at_rank, z, start, rank_ids)
            if next_ids is not None:
                _gather_into(at_next, z, start, next_ids)
            shifted = torch.sub(z, top[:, None], out=z if blocks.overwritable else scratch.shifted(z))
            if reference is not None:
                crosses.append(_rowdot(reference.blocks[index], shifted, scratch.exp(z)))
            exp = torch.exp(shifted, out=scratch.exp(z))
            totals.append(exp.sum(1))
            weighted.append(torch.mul(exp, shifted, out=shifted).sum(1))
            maxima.append(top)
    if threshold is not None:
        above = _recount(blocks, above.long(), threshold[:, 0], at_rank, rank_ids)
    return _merge(maxima, leader.top1, totals, weighted, crosses, reference, at_next, above)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch's CPU ops on one intra-op thread inside the block, restoring the caller's count after it.

    The count is process-wide: other Python threads running torch ops meanwhile would run on one thread too.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class _Leader:
    """The running arg-max over blocks: a block's arg-max is taken only for rows whose maximum it raises."""

    rows: int
    top1: torch.Tensor | None = None
    best: torch.Tensor | None = None

    def update(self, block: torch.Tensor, top: torch.Tensor, start: int) -> None:
        """Take ``block``'s arg-max (the first on ties) where its maximum ``top`` beats every earlier block's."""
        if self.best is None:
            self.top1, self.best = block.argmax(1) + start, top.clone()
            return
        raised = torch.nonzero(top > self.best).squeeze(1)
        if len(raised):
            self.top1[raised] = block[raised].argmax(1) + start
            self.best[raised] = top[raised]


def _recount(
    blocks: Blocks | KeptBlocks, above: torch.Tensor, threshold: torch.Tensor, exact: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Recount the rows whose threshold is not their token's logit in the blocks (a BLAS that rounds by width)."""
    wrong = torch.nonzero(exact != threshold).squeeze(1)
    if len(wrong):
        logits = blocks.rows_of(wrong)
        above = above.clone()
        above[wrong] = (logits > logits.gather(1, ids[wrong, None])).sum(1)
    return above


@dataclass
class _Scratch:
    """Reused block-sized buffers: the exponentials, the shifted logits of kept blocks, the comparison mask."""

    values: torch.Tensor
    spare: torch.Tensor
    flags: torch.Tensor

    @classmethod
    def for_blocks(cls, rows: int, width: int) -> "_Scratch":
        """Buffers for blocks of ``rows x width`` elements."""
        size = rows * width
        return cls(torch.empty(size), torch.empty(size), torch.empty(size, dtype=torch.bool))

    def exp(self, like: torch.Tensor) -> torch.Tensor:
        """A float buffer of ``like``'s shape."""
        return self.values[: like.numel()].view(like.shape)

    def shifted(self, like: torch.Tensor) -> torch.Tensor:
        """A second float buffer of ``like``'s shape."""
        return self.spare[: like.numel()].view(like.shape)

    def mask(self, like: torch.Tensor) -> torch.Tensor:
        """A boolean buffer of ``like``'s shape."""
        return self.flags[: like.numel()].view(like.shape)


def _gather_into(values: torch.Tensor, block: torch.Tensor, start: int, ids: torch.Tensor) -> None:
    """Write ``block[i, ids[i] - start]`` into ``values[i]`` for the rows whose token lies in the block."""
    rows = torch.nonzero((ids >= start) & (ids < start + block.shape[1])).squeeze(1)
    if len(rows):
        values[rows] = block[rows, ids[rows] - start]


def _rowdot(left: torch.Tensor, right: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two ``(n, w)`` blocks through a scratch block."""
    return torch.mul(left, right, out=scratch).sum(1)


def _merge(
    maxima: list[torch.Tensor],
    top1: torch.Tensor,
    totals: list[torch.Tensor],
    weighted: list[torch.Tensor],
    crosses: list[torch.Tensor],
    reference: Reference | None,
    at_next: torch.Tensor,
    above: torch.Tensor | None,
) -> RowStats:
    """Combine per-block statistics (each ``(n,)``) shifted by their block maxima into whole-row ones."""
    block_max = torch.stack(maxima, 1)
    top = block_max.amax(1)
    offset = block_max - top[:, None]  # m_b - m <= 0
    scale = offset.exp()
    block_totals = torch.stack(totals, 1)
    total = (scale * block_totals).sum(1)
    weighted_sum = (scale * (torch.stack(weighted, 1) + offset * block_totals)).sum(1)
    cross = None
    if reference is not None:
        cross = (torch.stack(crosses, 1) + offset * reference.masses).sum(1)
    return RowStats(top, top1, total.log(), total, weighted_sum, cross, at_next, above)
