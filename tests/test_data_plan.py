"""The distillation data plan: every rank the same number of samples, shard locality, resume."""
from collections import Counter

import pytest

from pipeline.training.pairs import StepBatches, epoch_plan, samples_per_rank


def flat(plan):
    return [(s, int(p)) for s, positions in plan for p in positions]


@pytest.mark.parametrize("counts, world", [
    ({0: 16, 1: 16, 2: 16, 3: 16}, 2),
    ({0: 16, 1: 16, 2: 9}, 2),       # short last shard
    ({0: 10}, 2),                    # fewer shards than ranks: shards split
    ({0: 8, 1: 8, 2: 8, 3: 8, 4: 3}, 3),
])
def test_equal_samples_per_rank(counts, world):
    per = samples_per_rank(counts, world)
    plans = [flat(epoch_plan(counts, 0, 0, r, world)) for r in range(world)]
    assert all(len(p) == per for p in plans)
    for p in plans:  # positions are valid
        assert all(0 <= pos < counts[s] for s, pos in p)


def test_divisible_corpus_is_seen_exactly_once_per_epoch():
    counts = {0: 8, 1: 8, 2: 8, 3: 8}
    seen = Counter(x for r in range(2) for x in flat(epoch_plan(counts, 3, 0, r, 2)))
    assert len(seen) == 32 and set(seen.values()) == {1}


def test_ranks_read_disjoint_shards():
    counts = {i: 8 for i in range(6)}
    shards = [{s for s, _ in epoch_plan(counts, 0, 0, r, 3)} for r in range(3)]
    assert not (shards[0] & shards[1]) and not (shards[1] & shards[2])


def test_order_changes_with_epoch_and_is_deterministic():
    counts = {i: 8 for i in range(4)}
    a, b = flat(epoch_plan(counts, 0, 0, 0, 1)), flat(epoch_plan(counts, 1, 0, 0, 1))
    assert a != b and sorted(a) == sorted(b)
    assert a == flat(epoch_plan(counts, 0, 0, 0, 1))


class Recorded:
    """A source whose samples say where they come from: (epoch, unit, position)."""

    def __init__(self, counts):
        self.counts = counts

    def unit_counts(self):
        return self.counts

    def samples(self, epoch, unit, positions):
        return [(epoch, unit, int(p)) for p in positions]


def test_step_batches_cut_the_epoch_plans_and_resume_at_any_step():
    counts = {0: 5, 1: 7, 2: 4}
    whole = StepBatches(Recorded(counts), seed=3, rank=0, world=1, batch_size=4, epochs=3)
    assert whole.steps_per_epoch == 4 and len(whole) == 12  # 16 samples: 4 full batches per epoch
    batches = [whole(i) for i in range(len(whole))]
    for epoch in range(3):
        plan = [(epoch, u, p) for u, p in flat(epoch_plan(counts, epoch, 3, 0, 1))]
        assert sum(batches[4 * epoch:4 * epoch + 4], []) == plan
    for first in (1, 4, 7, 11):  # a resumed run reads what the uninterrupted one would have
        resumed = StepBatches(Recorded(counts), seed=3, rank=0, world=1, batch_size=4, epochs=3, first_step=first)
        assert [resumed(i) for i in range(len(resumed))] == batches[first:]
