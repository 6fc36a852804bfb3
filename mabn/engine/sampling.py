"""Data order and augmentation that depend only on (seed, epoch, index): exact resume from any step.

Training samplers yield ``(epoch, index)`` keys (:class:`ResumableDistributedSampler` for classification;
the detection trainer groups by aspect ratio) and can start anywhere inside an epoch; :class:`SeededDataset`
seeds the random generators from the key before the transforms run. The random crop and flip of a sample
therefore never depend on which worker loaded it or on whether the run was interrupted, so a resumed run
sees exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset, Sampler


class ResumableDistributedSampler(Sampler):
    """Per epoch: a permutation seeded by ``(seed, epoch)``, cut to a multiple of ``world_size * batch_size``
    (every rank takes the same number of full batches), rank ``r`` taking every ``world_size``-th index."""

    def __init__(self, dataset_size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch = dataset_size // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training set has {dataset_size} samples, fewer than one global batch of "
                f"{world_size} x {batch_size}"
            )
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate over ``epoch``, skipping its first ``start_batch`` batches (already trained on)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.dataset_size, generator=g)[: self.batches_per_epoch * self.batch_size * self.world_size]
        return order[self.rank::self.world_size].tolist()

    def __iter__(self):
        for index in self._indices()[self.start_batch * self.batch_size:]:
            yield self.epoch, index

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class SeededDataset(Dataset):
    """Takes ``(epoch, index)`` and loads the sample with torch / random seeded from ``(seed, epoch, index)``.

    The global generators are left as they were: with no loader workers, loading runs in the training process,
    where the model may draw from the same generators (e.g. the RPN / RoI samplers of Mask R-CNN)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        sample_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            try:
                # the CPU generator only, which is what the transforms draw from and what fork_rng(devices=[])
                # restores: torch.manual_seed would also reseed every CUDA generator (~100 us per sample, and,
                # with no loader workers, the training process's own, left reseeded afterwards)
                torch.default_generator.manual_seed(sample_seed)
                random.seed(sample_seed)
                return self.dataset[index]
            finally:
                random.setstate(python_state)


def shard_indices(dataset_size: int, rank: int, world_size: int) -> list[int]:
    """Evaluation shard of one rank: every sample exactly once over all ranks, no padding duplicates."""
    return list(range(rank, dataset_size, world_size))


def evaluation_subset(dataset_size: int, max_samples: int) -> list[int]:
    """``TEST.MAX_IMAGES``: that many indices spread evenly over the dataset (every index when 0 or at least its
    size). Spread rather than the first ones, so that a set ordered by class (ImageFolder) keeps every class."""
    if max_samples <= 0 or max_samples >= dataset_size:
        return list(range(dataset_size))
    return [i * dataset_size // max_samples for i in range(max_samples)]
