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

    With `shards` (the store shard of each index, `mirl.shards`), a pass deals whole shards to ranks instead: the
    shards in a (seed, epoch) order, every world_size-th to a rank, each rank's images then in an order of their
    own; partners come from the rank's shards only (a patient's images share a shard). So each rank reads its own
    disjoint part of the store, and all ranks together read all of it once per pass. Shares are made equal as
    above (padded with the rank's own images by wrapping, or cut with `drop_last`). Fewer shards than ranks (a
    small label fraction): images are dealt one by one, as without shards.
    """

    def __init__(self, size: int, seed: int, drop_last: bool, passes: int = 1,
                 partners: list[list[int]] | None = None, shards: np.ndarray | None = None) -> None:
        self.size, self.seed, self.drop_last, self.passes, self.partners = size, seed, drop_last, passes, partners
        self.shards = shards
        if shards is not None:  # each shard's indices, in index order: found once, not at every epoch
            _, members = np.unique(shards, return_inverse=True)
            self.by_shard = np.split(np.argsort(members, kind="stable"), np.cumsum(np.bincount(members))[:-1])
        self.indices, self.paired_with = self.draw(0)

    def order(self, epoch: int) -> list[int]:
        """This rank's indices (anchors) of `epoch`, in order."""
        return self.draw(epoch)[0]

    def draw(self, epoch: int) -> tuple[list[int], list[int] | None]:
        """This rank's anchors of `epoch` and, when pairing, their partners."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        if self.shards is not None and len(self.by_shard) >= world_size():
            return self.draw_shards(generator)
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

    def draw_shards(self, generator: torch.Generator) -> tuple[list[int], list[int] | None]:
        """This rank's anchors (and partners) of an epoch whose passes deal whole shards to ranks."""
        world, this_rank, by_shard = world_size(), rank(), self.by_shard
        anchors: list[int] = []
        partners: list[int] | None = None if self.partners is None else []
        for _ in range(self.passes):
            order = torch.randperm(len(by_shard), generator=generator).tolist()
            # every rank draws every rank's order from the one stream, so all agree on the shares' sizes
            shares = [np.concatenate([by_shard[i] for i in order[r::world]]) for r in range(world)]
            shares = [share[torch.randperm(len(share), generator=generator).numpy()] for share in shares]
            draws = [torch.randint(0, 2 ** 31 - 1, (len(share),), generator=generator) for share in shares]
            length = min(map(len, shares)) if self.drop_last else max(map(len, shares))
            mine = np.resize(shares[this_rank], length)  # padded by wrapping, or cut
            anchors += mine.tolist()
            if partners is not None:
                in_my_shards = set(shares[this_rank].tolist())
                for i, draw in zip(mine.tolist(), np.resize(draws[this_rank].numpy(), length).tolist()):
                    candidates = [j for j in self.partners[i] if j in in_my_shards]
                    partners.append(candidates[draw % len(candidates)] if candidates else i)
        return anchors, partners

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
    passes over the data per epoch, in pairs with `partners`, whole shards to each rank when the dataset reads a
    sharded store); workers only read and decode (all random augmentation happens in the main process, from
    saved generators). When the dataset's store hands items over encoded (`decode_on`), the workers only read
    bytes and each batch decodes on that device (`DeviceDecodingLoader`)."""
    shards = dataset.item_shards() if hasattr(dataset, "item_shards") else None
    sampler = EpochSampler(len(dataset), seed, drop_last, passes, partners, shards) if shuffle else None
    decode_on = getattr(dataset, "decode_on", None)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                        worker_init_fn=_ignore_interrupts if workers > 0 else None,
                        collate_fn=collate_encoded if decode_on is not None else None,
                        generator=torch.Generator().manual_seed(seed))
    return loader if decode_on is None else DeviceDecodingLoader(loader)


def collate_encoded(items: list[tuple]) -> tuple[list, torch.Tensor, torch.Tensor]:
    """A batch of encoded items, which differ in length: listed (a pair's two items one after the other), with the
    labels and readable flags stacked."""
    images = [part for image, _, _ in items for part in (image if isinstance(image, list) else [image])]
    return images, torch.stack([labels for _, labels, _ in items]), torch.tensor([ok for _, _, ok in items])


class DeviceDecodingLoader:
    """A loader whose batches arrive encoded and leave decoded on the store's device: one batched nvJPEG call per
    batch on a GPU, so the workers only read bytes and are not the limit. It passes on the loader's sampler,
    dataset and length, so the training loop takes it as the loader it wraps."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.sampler, self.dataset, self.batch_size = loader.sampler, loader.dataset, loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for items, labels, ok in self.loader:
            pairs = len(items) // len(ok)
            images, decoded = self.dataset.decode_batch(items, ok.repeat_interleave(pairs))
            if pairs > 1:  # a pair is readable when its anchor is; an undecodable partner becomes the anchor
                images = images.view(len(ok), pairs, *images.shape[1:])
                decoded = decoded.view(len(ok), pairs)
                images[:, 1][~decoded[:, 1]] = images[:, 0][~decoded[:, 1]]
                decoded = decoded[:, 0]
            yield images, labels, ok & decoded


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
