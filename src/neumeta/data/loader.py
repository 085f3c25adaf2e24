"""Batches straight out of in-memory tensors.

For small images that already sit in one tensor, torch's DataLoader spends most of its time
collating samples one by one; indexing the tensor with a whole batch of indices is far faster.
"""

import math

import torch


class TensorLoader:
    """Iterate (x_batch, y_batch) pairs over tensors `x` and `y`, optionally sharded across ranks.

    The order depends only on (seed, epoch), so call `set_epoch` each epoch to reshuffle, as with
    DistributedSampler; without it every epoch repeats the same order.

    With world_size > 1 each rank takes every world_size-th index of the epoch's permutation, so
    the shards are disjoint. To give every rank the same number of batches, the permutation is
    padded by wrapping around to its start (or, with drop_last, its tail is dropped).
    drop_last also drops each rank's final incomplete batch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}")
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if world_size <= 0:
            raise ValueError(f"world_size must be > 0, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must satisfy 0 <= rank < world_size={world_size}, got {rank}")

        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

        if drop_last:
            self.samples_per_rank = len(x) // world_size
        else:
            self.samples_per_rank = math.ceil(len(x) / world_size)

    def set_epoch(self, epoch: int) -> None:
        """Pick the shuffle order for `epoch`; every rank must use the same epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    def __iter__(self):
        indices = self.rank_indices().to(self.x.device)
        for batch in range(len(self)):
            batch_indices = indices[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield self.x[batch_indices], self.y[batch_indices]

    def rank_indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in the order they are batched."""
        n = len(self.x)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)

        total = self.samples_per_rank * self.world_size
        if total > n:
            # Wrap around (repeatedly, if there are fewer samples than ranks) to fill every rank.
            order = order.repeat(math.ceil(total / n))
        return order[:total][self.rank :: self.world_size]
