"""Data order: a pure function of (seed, step, rank, world size); each rank reads its own shards; length grouping."""

import random

import pytest

from llava_hpc.data.sampling import SampleStream, compare_padding, padding_fraction

GROUPS = [i // 25 for i in range(400)]  # 16 shards of 25 samples
LENGTHS = [random.Random(i).randint(20, 900) for i in range(400)]


def epoch(stream, steps):
    return [i for step in range(steps) for i in stream.step_indices(step)]


def test_one_rank_reads_whole_epochs_reshuffled_and_resumes_at_any_step():
    stream = SampleStream(10, 4, seed=3)
    flat = epoch(stream, 5)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10)) and flat[:10] != flat[10:20]
    again = SampleStream(10, 4, seed=3)
    assert [again.step_indices(s) for s in reversed(range(5))][::-1] == [flat[s * 4 : s * 4 + 4] for s in range(5)]
    assert SampleStream(10, 4, seed=4).step_indices(0) != flat[:4]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_read_disjoint_shards_and_together_every_sample_once(world):
    streams = [SampleStream(400, 20, seed=1, groups=GROUPS, window=2, rank=r, world_size=world) for r in range(world)]
    per_rank = [epoch(s, 400 // world // 20) for s in streams]
    everything = [i for part in per_rank for i in part]
    assert sorted(everything) == list(range(400))  # 400 divides evenly: nothing dropped
    shard_sets = [{GROUPS[i] for i in part} for part in per_rank]
    assert sum(map(len, shard_sets)) <= 16 + world - 1  # at most one shard shared at each cut
    for part in per_rank:  # a window's stretch comes from 2 shards (3 where a cut splits one)
        assert all(len({GROUPS[i] for i in part[a : a + 25]}) <= 3 for a in range(0, len(part), 25))
    # Pure function of (seed, step, rank, world): a fresh stream for rank 1 resumed at step 3 agrees.
    resumed = SampleStream(400, 20, seed=1, groups=GROUPS, window=2, rank=1, world_size=world)
    assert resumed.step_indices(3) == per_rank[1][60:80]
    next_epoch = [i for s in streams for i in s.positions(400 // world, 400 // world).tolist()]
    assert sorted(next_epoch) == list(range(400)) and next_epoch != everything


def test_remainder_sits_out_and_rank_argument_is_checked():
    streams = [SampleStream(403, 10, seed=0, rank=r, world_size=2) for r in range(2)]
    seen = [i for s in streams for i in s.epoch_order(0).tolist()]
    assert len(seen) == len(set(seen)) == 402
    with pytest.raises(ValueError, match="rank 2 is not in"):
        SampleStream(10, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="groups names 39 samples"):
        SampleStream(40, 4, seed=1, groups=GROUPS[:39])


def test_length_grouped_micro_batches_pad_far_less_and_keep_the_epoch():
    stream = SampleStream(400, 16, seed=2, groups=GROUPS, window=4, lengths=LENGTHS, micro_batch=8,
                          megabatch_batches=10)
    flat = epoch(stream, 25)
    assert sorted(flat) == list(range(400))
    batches = [flat[i : i + 8] for i in range(0, 400, 8)]
    plain = epoch(SampleStream(400, 16, seed=2, groups=GROUPS, window=4), 25)
    assert padding_fraction(LENGTHS, batches) < padding_fraction(LENGTHS, [plain[i : i + 8] for i in range(0, 400, 8)]) / 3
    # Steps mix long and short micro-batches: not sorted longest first.
    maxima = [max(LENGTHS[i] for i in b) for b in batches]
    assert maxima[:10] != sorted(maxima[:10], reverse=True)
    report = compare_padding(LENGTHS, 8, megabatch_batches=10)
    assert report["length_grouped"] < report["random"] / 3 and 0 < report["random"] < 1
    assert padding_fraction([3, 1], [[0, 1]]) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="no whole number of micro-batches"):
        SampleStream(400, 12, seed=0, lengths=LENGTHS, micro_batch=8)
