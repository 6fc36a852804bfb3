"""Aspect-ratio grouped batching for detection.

Batching only landscape or only portrait images keeps the zero padding that ``GeneralizedRCNNTransform``
adds to batch differently shaped images small. Unlike torchvision's reference sampler, which tops up the last
batches with repeated images and drops the rest, every index the underlying sampler yields lands in exactly
one batch; the last batch of a group may be smaller than ``batch_size``.
"""
from __future__ import annotations

import copy
from collections import Counter

from torch.utils.data import BatchSampler, DistributedSampler, Sampler


class GroupedBatchSampler(BatchSampler):
    """Batches of ``batch_size`` indices from ``sampler`` that all share a ``group_ids`` entry.

    Full batches are yielded as soon as a group's buffer fills, in the sampler's order; what is left in the
    buffers at the end of the epoch is yielded as one smaller batch per group, fullest first.

    On top of a ``DistributedSampler`` the number of batches can differ between ranks (it depends on how the
    groups fall into each shard), and DDP hangs if one rank stops early. Every rank therefore computes the
    batch count of every shard (the shards are a deterministic function of seed and epoch) and ranks with
    fewer batches repeat their first batches, just as ``DistributedSampler`` pads its indices.
    """

    def __init__(self, sampler: Sampler, group_ids, batch_size: int):
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler should be a torch.utils.data.Sampler, got {type(sampler).__name__}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size should be a positive integer, got {batch_size!r}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size

    def _batches(self, indices):
        buffers: dict[int, list[int]] = {}
        for idx in indices:
            buffer = buffers.setdefault(self.group_ids[idx], [])
            buffer.append(idx)
            if len(buffer) == self.batch_size:
                yield buffer
                del buffers[self.group_ids[idx]]
        yield from sorted((b for b in buffers.values()), key=len, reverse=True)

    def _num_batches(self, indices) -> int:
        counts = Counter(self.group_ids[idx] for idx in indices)
        return sum(-(-n // self.batch_size) for n in counts.values())

    def _shards(self):
        """The index lists of every rank that iterates this sampler this epoch."""
        if isinstance(self.sampler, DistributedSampler):
            for rank in range(self.sampler.num_replicas):
                shard = copy.copy(self.sampler)
                shard.rank = rank
                yield list(shard)
        else:
            yield list(self.sampler)

    def __len__(self) -> int:
        return max((self._num_batches(shard) for shard in self._shards()), default=0)

    def __iter__(self):
        yielded = []
        for batch in self._batches(self.sampler):
            yielded.append(batch)
            yield batch
        if isinstance(self.sampler, DistributedSampler):
            for i in range(len(self) - len(yielded)):
                yield list(yielded[i % len(yielded)])


def aspect_ratio_group_ids(dataset) -> list[int]:
    """0 for landscape (width >= height) images, 1 for portrait ones, from ``dataset.get_height_and_width``."""
    group_ids = []
    for idx in range(len(dataset)):
        height, width = dataset.get_height_and_width(idx)
        group_ids.append(0 if width >= height else 1)
    return group_ids


def collate_fn(batch):
    """``[(image, target), ...]`` -> ``([images], [targets])``: detection models take lists of variable-size images."""
    return tuple(list(items) for items in zip(*batch))
