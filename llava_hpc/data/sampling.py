"""Which samples each rank trains on at each step: a pure function of (seed, step, rank, world_size).

Epoch e, the same on every rank:
  1. the feature shards (each sample's `group`; -1 = text only) are permuted, seeded by (seed, e), and their
     samples concatenated shard after shard;
  2. that sequence is cut into `world_size` contiguous equal chunks (the remainder, < world_size samples, is left
     out this epoch); rank r takes chunk r, so it reads about 1/world of the shards, plus at most one shard it shares
     with each neighbouring rank at the cut;
  3. within its chunk a rank mixes `window` shards at a time (their samples shuffled together), so it holds about
     two windows of decoded shards, however many ranks there are;
A rank's stream is its chunks of epochs 0, 1, 2, ... one after another; step s takes positions [s*B, (s+1)*B) of
it. With `lengths`, each rank's epoch order is cut into megabatches of `megabatch_batches` micro-batches (as
transformers' LengthGroupedSampler; a megabatch spans at most two windows when a window holds more samples), each
sorted by length and its micro-batches shuffled: micro-batches of similar lengths (little padding), steps of mixed
lengths. An epoch then holds whole micro-batches: up to `world_size * micro_batch - 1` samples sit that epoch out. With one rank this is the whole epoch, so a resumed run sees exactly what an uninterrupted one would.
"""

from __future__ import annotations

from typing import Sequence

import torch

MEGABATCH_BATCHES = 50  # transformers' LengthGroupedSampler default


class SampleStream:
    def __init__(
        self,
        num_samples: int,
        batch: int,
        seed: int,
        groups: Sequence[int] | None = None,
        window: int = 1,
        rank: int = 0,
        world_size: int = 1,
        lengths: Sequence[int] | None = None,
        micro_batch: int | None = None,
        megabatch_batches: int = MEGABATCH_BATCHES,
    ):
        """`batch`: samples per step on this rank (micro-batch x grad_accum). `lengths` turn on length grouping
        of micro-batches of `micro_batch` samples (default: the whole step is one micro-batch)."""
        for name, given in (("groups", groups), ("lengths", lengths)):
            if given is not None and len(given) != num_samples:
                raise ValueError(f"{name} names {len(given)} samples, the stream has {num_samples}")
        if window < 1:
            raise ValueError(f"the shuffle window must hold at least one shard, got {window}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be split over {world_size} ranks")
        self.micro_batch = micro_batch or batch
        if batch % self.micro_batch:
            raise ValueError(f"a step of {batch} samples is no whole number of micro-batches of {self.micro_batch}")
        self.num_samples, self.batch, self.seed, self.window = num_samples, batch, seed, window
        self.rank, self.world_size = rank, world_size
        self.groups = torch.as_tensor(list(groups) if groups is not None else [0] * num_samples, dtype=torch.long)
        self.lengths = None if lengths is None else torch.as_tensor(list(lengths), dtype=torch.long)
        self.chunk = num_samples // world_size  # samples per rank per epoch
        if self.lengths is not None and self.chunk >= self.micro_batch:
            # Whole micro-batches per epoch, so the grouped micro-batches line up with the loop's in every epoch.
            self.chunk -= self.chunk % self.micro_batch
        self.megabatch = megabatch_batches * self.micro_batch
        # Shards in a fixed order (sorted ids), each its samples in index order: the permutation's starting point.
        self._shard_ids, self._shard_sizes = torch.unique(self.groups, return_counts=True)
        self._by_shard = torch.argsort(self.groups, stable=True)
        self._orders: dict[int, torch.Tensor] = {}

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's samples of `epoch` in training order ([chunk] indices)."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a step straddles at most two epochs
                del self._orders[min(self._orders)]
            self._orders[epoch] = self._rank_order(epoch)
        return self._orders[epoch]

    def _rank_order(self, epoch: int) -> torch.Tensor:
        shared = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        shard_order = torch.randperm(len(self._shard_ids), generator=shared).tolist()
        starts = (torch.cumsum(self._shard_sizes, 0) - self._shard_sizes).tolist()
        sizes = self._shard_sizes.tolist()
        sequence = torch.cat([self._by_shard[starts[s] : starts[s] + sizes[s]] for s in shard_order])
        chunk = sequence[self.rank * self.chunk : (self.rank + 1) * self.chunk]
        # Seeded per (seed, epoch, rank): rank r's order never depends on another rank's.
        local = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_009 + self.rank)
        windows = _windows(self.groups[chunk], self.window)
        order = torch.cat([chunk[w][torch.randperm(len(w), generator=local)] for w in windows])
        return order if self.lengths is None else self._group_by_length(order, local)

    def _group_by_length(self, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        grouped = []
        for start in range(0, len(order), self.megabatch):
            megabatch = order[start : start + self.megabatch]
            # Stable sort of shuffled samples: ties stay in random order.
            megabatch = megabatch[torch.argsort(self.lengths[megabatch], descending=True, stable=True)]
            whole = len(megabatch) // self.micro_batch * self.micro_batch
            batches = megabatch[:whole].view(-1, self.micro_batch)
            # Then the micro-batches shuffled: no run of steps of only long (or only short) samples.
            grouped += [batches[torch.randperm(len(batches), generator=generator)].flatten(), megabatch[whole:]]
        return torch.cat(grouped)

    def positions(self, start: int, count: int) -> torch.Tensor:
        """Positions [start, start + count) of this rank's stream (its epochs' orders one after another)."""
        taken = []
        while count:
            epoch, offset = divmod(start, self.chunk)
            piece = self.epoch_order(epoch)[offset : offset + count]
            taken.append(piece)
            start, count = start + len(piece), count - len(piece)
        return torch.cat(taken)

    def step_indices(self, step: int) -> list[int]:
        """This rank's `batch` samples of optimizer step `step`."""
        return self.positions(step * self.batch, self.batch).tolist()

    # With one rank a step's samples are the whole global batch (the name bench_feature_store.py uses).
    global_batch_indices = step_indices


def _windows(chunk_groups: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Positions of `chunk_groups` (runs of equal shard ids) in windows of `window` consecutive runs."""
    run_starts = torch.cat([torch.tensor([0]), (chunk_groups[1:] != chunk_groups[:-1]).nonzero().flatten() + 1])
    bounds = run_starts[::window].tolist() + [len(chunk_groups)]
    return [torch.arange(a, b) for a, b in zip(bounds, bounds[1:])]


def padding_fraction(lengths: Sequence[int], micro_batches: Sequence[Sequence[int]]) -> float:
    """Padded positions / all positions when each micro-batch (indices into `lengths`) is padded to its longest."""
    lengths = torch.as_tensor(list(lengths), dtype=torch.long)
    real = total = 0
    for batch in micro_batches:
        batch_lengths = lengths[torch.as_tensor(list(batch), dtype=torch.long)]
        real += int(batch_lengths.sum())
        total += int(batch_lengths.max()) * len(batch_lengths)
    return 1.0 - real / total if total else 0.0


def compare_padding(lengths: Sequence[int], micro_batch: int, seed: int = 0,
                    megabatch_batches: int = MEGABATCH_BATCHES) -> dict[str, float]:
    """Padding fraction of one epoch in micro-batches of `micro_batch`: shuffled ("random") vs length-grouped."""
    result = {}
    for name, grouped in (("random", None), ("length_grouped", lengths)):
        stream = SampleStream(len(lengths), micro_batch, seed, lengths=grouped, megabatch_batches=megabatch_batches)
        order = stream.positions(0, len(lengths) // micro_batch * micro_batch).tolist()
        result[name] = padding_fraction(lengths, [order[i : i + micro_batch] for i in range(0, len(order), micro_batch)])
    return result
