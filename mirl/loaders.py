"""Data loading for training and evaluation: epoch orders drawn from (seed, epoch) alone, so a resumed run
replays them exactly, loaders whose workers only decode, and batches mended around unreadable images."""
from __future__ import annotations

import signal
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mirl.distributed import rank, world_size


class EpochSampler(Sampler[int]):
    """The order of one epoch, drawn from (seed, epoch) alone, so a resumed run replays it exactly.

    An epoch makes `passes` passes over the data, each in its own order: a split of a few dozen images
    then still gives an epoch enough optimizer steps, without an epoch-end evaluation and training state
    after every step. Under torchrun each rank takes every world_size-th index of that order (padded by wrapping, or cut
    with `drop_last`, to equal shares, like DistributedSampler). `start(epoch, first)` begins an epoch at
    position `first`: a run resumed after B batches skips the 'B x batch size' images it trained on
    without reading them.

    With `partners` (each index's candidate partners, `mirl.positives`), it yields (anchor, partner) pairs,
    each partner drawn from the anchor's candidates from the same (seed, epoch) stream; an anchor without
    candidates is its own partner. `indices` are the anchors either way.
    """

    def __init__(self, size: int, seed: int, drop_last: bool, passes: int = 1,
                 partners: list[list[int]] | None = None) -> None:
        self.size, self.seed, self.drop_last, self.passes, self.partners = size, seed, drop_last, passes, partners
        self.indices, self.paired_with = self.draw(0)

    def order(self, epoch: int) -> list[int]:
        """This rank's indices (anchors) of `epoch`, in order."""
        return self.draw(epoch)[0]

    def draw(self, epoch: int) -> tuple[list[int], list[int] | None]:
        """This rank's anchors of `epoch` and, when pairing, their partners."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        permutation = torch.cat([torch.randperm(self.size, generator=generator) for _ in range(self.passes)])
        partners = None
        if self.partners is not None:  # drawn for the whole order before sharding: the same for any world size
            draws = torch.randint(0, 2 ** 31 - 1, (len(permutation),), generator=generator).tolist()
            partners = torch.tensor([self.partners[i][draw % len(self.partners[i])] if self.partners[i] else i
                                     for i, draw in zip(permutation.tolist(), draws)], dtype=torch.long)
        world, this_rank = world_size(), rank()
        if world > 1:
            length = len(permutation)
            share = length // world if self.drop_last else -(-length // world)
            repeats = -(-share * world // length)
            permutation = permutation.repeat(repeats)[:share * world][this_rank::world]
            if partners is not None:
                partners = partners.repeat(repeats)[:share * world][this_rank::world]
        return permutation.tolist(), None if partners is None else partners.tolist()

    def start(self, epoch: int, first: int = 0) -> None:
        indices, partners = self.draw(epoch)
        self.indices, self.paired_with = indices[first:], None if partners is None else partners[first:]

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        return iter(self.indices) if self.paired_with is None else zip(self.indices, self.paired_with)

    def __len__(self) -> int:
        return len(self.indices)


def epoch_seed(seed: int, epoch: int) -> int:
    """A generator seed for (seed, epoch), hashed so runs of different seeds share no epoch order (seed + epoch
    would give seed 1's epoch 0 the order of seed 0's epoch 1, and multi-seed studies would understate variance)."""
    return int(np.random.SeedSequence([seed % (1 << 64), epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _ignore_interrupts(worker_id: int) -> None:
    """Ctrl-C, and the SIGTERM a cluster's scheduler sends before pre-empting a job, reach the whole process
    group: workers leave them to the main process, which saves its state and then shuts them down (a worker
    killed by SIGTERM would take the run down with it before anything was saved). A worker whose main
    process dies anyway exits on its own: torch's workers watch their parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool, drop_last: bool,
                seed: int, passes: int = 1, partners: list[list[int]] | None = None) -> DataLoader:
    """A loader of uint8 batches. Shuffled loaders draw their order from an `EpochSampler` (of `passes`
    passes over the data per epoch, in pairs with `partners`); workers only decode files (all random
    augmentation happens in the main process, from saved generators)."""
    sampler = EpochSampler(len(dataset), seed, drop_last, passes, partners) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      worker_init_fn=_ignore_interrupts if workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))


def readable_batch(images: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch with each unreadable image replaced by a readable one of the same batch, in turn. A batch
    keeps its size: under torchrun every rank's all-gather then sees equal shares (a rank whose batch
    shrank would hang the others), and a compiled step never meets a new shape."""
    if ok.all():
        return images, labels
    good, bad = ok.nonzero().flatten(), (~ok).nonzero().flatten()
    source = good[torch.arange(len(bad)) % len(good)]
    images, labels = images.clone(), labels.clone()
    images[bad], labels[bad] = images[source], labels[source]
    return images, labels
