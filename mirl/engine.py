"""The one training loop and what every run shares: device and precision, seeding, data loading,
prediction, training states and logs.

Pretraining and downstream training differ only in the `step_loss` function, the end-of-epoch
callback and the snapshot of their own weights they hand to `Trainer`.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so runs on one output dir are not kept apart
    fcntl = None

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from mirl.augment import evaluation_view
from mirl.datasets import ImageDataset
from mirl.checkpoints import CheckpointStore, random_state, restore_random_state, resume_state, writing
from mirl.distributed import any_rank, gather_objects, is_main_process, local_rank, rank, world_size
from mirl.errors import DataError, InputError, OutputError
from mirl.models import ENCODER_CLASSES


def resolve_device(requested: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU; asking for CUDA without one is an input error."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None for fp32). `auto`: bf16 on Ampere+ GPUs and on CPUs with AMX/AVX-512
    bf16 (with AMX a MoCo v2 ResNet-50 step ran 1.8x faster than fp32), fp16 on older GPUs, fp32 elsewhere."""
    if requested == "fp32":
        return None
    if requested == "bf16":
        return torch.bfloat16
    if requested == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def prepare_network(model: nn.Module, device: torch.device, channels_last: bool, compile_encoders: bool) -> nn.Module:
    """Move a network to its device, in channels_last layout when asked (convolutions then skip layout
    conversions; a convolution runs channels_last when its weight is, whatever its input), and compile
    each encoder network inside it in place with torch.compile, so parameter names and checkpoints are unchanged."""
    model = model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
    if compile_encoders:
        for module in model.modules():
            if isinstance(module, ENCODER_CLASSES):
                module.compile()
    return model


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; each rank gets its own stream so augmentations differ across GPUs.

    `deterministic` also forbids kernels whose result depends on scheduling (cuDNN autotuning, atomic
    adds on the GPU), so the same seed gives the same weights and a resumed run matches an unbroken one.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    seed = seed + rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_run(output_dir: Path, keep: int, publish: bool,
             resume: str | None) -> tuple[CheckpointStore, Path | None, dict | None]:
    """Before any heavy work: the output dir proven writable and held by this run alone, its store of
    training states, and the state `--resume` asks to continue from (its path and contents; None for a
    fresh run)."""
    prepare_output_dir(output_dir)
    lock_output_dir(output_dir)
    store = CheckpointStore(output_dir, keep, publish)
    resume_from, resumed = resume_state(resume, store)
    return store, resume_from, resumed


PROBE_BYTES = 2 ** 20


def prepare_output_dir(path: Path) -> None:
    """Create the output dir and prove it writable now, not after hours of training."""
    prove_writable(path, "--output-dir")


def prove_writable(path: Path, flag: str) -> None:
    """Create the folder `flag` names and write a megabyte into it (an empty file can be created on a full
    disk), or stop with one OutputError."""
    probe = path / f".write-test.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise OutputError(f"{flag} {path} cannot be written ({error.strerror or type(error).__name__})") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # not a folder at all: nothing was written
            pass


_HELD_LOCKS: dict[Path, IO[str]] = {}


def lock_output_dir(path: Path) -> None:
    """Hold `path/.lock` until `release_output_dirs` (rank 0's, under torchrun), so a second run started on
    the same output dir stops at once instead of writing its records beside this one's. The operating system
    releases the lock when the process ends, however it ends."""
    key = path.resolve()
    if fcntl is None or not is_main_process() or key in _HELD_LOCKS:
        return
    handle = open(path / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip()
        handle.close()
        raise OutputError(f"another run{f' (process {owner})' if owner.isdigit() else ''} is writing to {path}; "
                          "wait for it to end or choose another --output-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _HELD_LOCKS[key] = handle


def release_output_dirs() -> None:
    """Let other runs use the output dirs this process locked (the scripts' edge calls it when a run ends)."""
    for handle in _HELD_LOCKS.values():
        handle.close()
    _HELD_LOCKS.clear()


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


@dataclass
class RunLog:
    """Where a run writes: TensorBoard events and JSON files, from the main process only."""

    output_dir: Path
    resumed_at_step: int | None = None

    def __post_init__(self) -> None:
        # a resumed run drops the events its killed predecessor logged after the state it continues from
        self.writer = SummaryWriter(str(self.output_dir), purge_step=self.resumed_at_step) \
            if is_main_process() else None

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(name, value, step)

    def json(self, name: str, payload: dict) -> None:
        if is_main_process():
            atomic_write_text(self.output_dir / name, json.dumps(payload, indent=2, default=str) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file of this process and rename: readers see the old or the new text.
    File names that are not valid UTF-8 (held by Python as surrogate escapes) are written back as the
    same bytes, so a list of image ids or files reads back exactly."""
    with writing(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")


class TrainingStep:
    """One optimisation step: `step_loss(images, labels)` under autocast, backward (scaled for fp16),
    optimizer and scheduler. A non-finite loss stops training before it corrupts the weights."""

    def __init__(self, step_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                 device: torch.device, precision: torch.dtype | None) -> None:
        self.step_loss, self.optimizer, self.scheduler = step_loss, optimizer, scheduler
        self.device, self.precision = device, precision
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
        self.steps = 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.autocast(self.device.type, dtype=self.precision) if self.precision else nullcontext():
            loss = self.step_loss(images, labels)
        value = loss.item()
        if any_rank(not math.isfinite(value), self.device):  # every rank stops together
            raise FloatingPointError(f"the loss became {value} at step {self.steps + 1}; "
                                     "lower the learning rate or use --precision fp32")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        return value


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped training; the message says where the state was saved."""


class StopSignals:
    """SIGINT and SIGTERM (Ctrl-C, a cluster's pre-emption notice) only raise a flag, which the loop
    checks between steps: the checkpoint it then writes is a consistent state, never one caught halfway
    through an optimizer step. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: object) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(number).name

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


class Trainer:
    """The one training loop, shared by pretraining and downstream training.

    Epochs of `step_loss(images, labels)` over a loader whose order comes from an `EpochSampler`.
    Unreadable images are replaced in their batch by readable ones of it (`readable_batch`), counted on the
    progress bar and listed once in `skipped.csv`. A training state goes to the `CheckpointStore` every
    `save_every` steps, at every epoch end and when Ctrl-C or SIGTERM arrives; `restore` continues from one
    exactly. `snapshot()` gives the caller's part of a state (weights and what it needs to reload them).
    """

    def __init__(self, step_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], loader: DataLoader,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 device: torch.device, precision: torch.dtype | None, store: CheckpointStore, save_every: int,
                 snapshot: Callable[[], dict]) -> None:
        if not isinstance(loader.sampler, EpochSampler):
            raise ValueError("the training loader must draw its order from an EpochSampler (make_loader shuffle)")
        self.step = TrainingStep(step_loss, optimizer, scheduler, device, precision)
        self.loader, self.sampler = loader, loader.sampler
        self.store, self.save_every, self.snapshot = store, save_every, snapshot
        self.device = device
        self.epoch, self.batch = 0, 0  # the next batch to train: `batch` batches of `epoch` are done
        self.skipped: list[list[str]] = []  # [image id, file, reason] of every unreadable image met
        self.skipped_csv = store.output_dir / "skipped.csv"
        if is_main_process():
            store.check_room(state_bytes(snapshot(), optimizer))

    def state(self) -> dict:
        step = self.step
        return {
            **self.snapshot(),
            "optimizer": step.optimizer.state_dict(),
            "scheduler": step.scheduler.state_dict() if step.scheduler is not None else None,
            "scaler": step.scaler.state_dict(),
            "steps": step.steps, "epoch": self.epoch, "batch": self.batch, "skipped": self.skipped,
            "random": gather_objects(random_state()),  # one entry per rank: each has its own streams
            "loader_generator": self.loader.generator.get_state(),
        }

    def restore(self, state: dict, source: Path) -> None:
        """Continue from a state written by `state()` and read from `source` (the caller has loaded its
        weights)."""
        step = self.step
        step.optimizer.load_state_dict(state["optimizer"])
        if step.scheduler is not None:
            step.scheduler.load_state_dict(state["scheduler"])
        step.scaler.load_state_dict(state["scaler"])
        step.steps, self.epoch, self.batch = state["steps"], state["epoch"], state["batch"]
        self.skipped = [list(row) for row in state["skipped"]]
        self._write_skipped()  # forget rows a killed predecessor wrote after this state
        self.loader.generator.set_state(state["loader_generator"])
        restore_random_state(state["random"][rank()])
        print(f"resuming from {source} (epoch {self.epoch}, batch {self.batch})", file=sys.stderr)

    def save(self) -> Path:
        return self.store.save(self.state(), self.epoch, self.batch)

    def fit(self, epochs: int, log: RunLog, end_of_epoch: Callable[[int], dict[str, float]],
            train_mode: Callable[[], None]) -> None:
        """Train up to `epochs` epochs; `end_of_epoch(epoch)` returns numbers for the progress bar."""
        batch_size = self.loader.batch_size
        epoch_bar = tqdm(range(self.epoch, epochs), desc="epochs", unit="epoch", initial=self.epoch, total=epochs,
                         disable=not is_main_process())
        with StopSignals() as stop:
            for epoch in epoch_bar:
                self.epoch = epoch
                self.sampler.start(epoch, self.batch * batch_size)
                train_mode()
                readable = 0
                batch_bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                                 initial=self.batch, total=self.batch + len(self.loader),
                                 disable=not is_main_process())
                for position, (images, labels, ok) in enumerate(batch_bar):
                    self.batch += 1
                    readable += int(ok.sum())
                    if not ok.all():
                        batch = self.sampler.indices[position * batch_size:(position + 1) * batch_size]
                        unreadable = [i for i, good in zip(batch, ok.tolist()) if not good]
                        self.note_unreadable(self.loader.dataset, unreadable)
                    # BatchNorm and contrastive pairs need at least two images; every rank skips together
                    if not any_rank(int(ok.sum()) < 2, self.device):
                        loss = self._train_step(*readable_batch(images, labels, ok))
                        log.scalar("train/loss", loss, self.step.steps)
                        log.scalar("train/lr", self.step.optimizer.param_groups[0]["lr"], self.step.steps)
                        batch_bar.set_postfix(loss=f"{loss:.4f}", skipped=len(self.skipped))
                        if self.save_every and self.step.steps % self.save_every == 0:
                            self.save()
                    if any_rank(stop.received is not None, self.device):
                        path = self.save()
                        raise TrainingInterrupted(f"{stop.received or 'a stop signal'} received: saved the state after "
                                                  f"epoch {epoch} batch {self.batch} to {path}; "
                                                  "continue with --resume auto")
                if readable == 0 and self.skipped:
                    raise DataError(f"none of the {len(self.sampler.indices)} images of epoch {epoch + 1} could be "
                                    f"read; the reasons are in {self.skipped_csv}")
                log.scalar("data/skipped_images", len(self.skipped), epoch)
                summary = end_of_epoch(epoch)
                self.epoch, self.batch = epoch + 1, 0
                self.save()
                epoch_bar.set_postfix({k: f"{v:.4f}" for k, v in summary.items() if v is not None},
                                      skipped=len(self.skipped))

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        try:
            return self.step(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
        except FloatingPointError as error:
            newest = self.store.newest()
            kept = f"the last good state is {newest}" if newest else "no state had been saved yet"
            raise FloatingPointError(f"{error}; {kept}") from None

    def note_unreadable(self, dataset: ImageDataset, indices: list[int]) -> None:
        """Record each unreadable image (of training, or of an evaluation split) once, with the reason its
        reader gives."""
        known = {row[0] for row in self.skipped}
        before = len(self.skipped)
        for index in indices:
            record = dataset.records[index]
            image_id = readable_text(record.image_id)
            if image_id not in known:
                self.skipped.append([image_id, readable_text(str(record.path)),
                                     readable_text(dataset.why_unreadable(index))])
                known.add(image_id)
        if len(self.skipped) > before:  # later epochs meet the same files again: nothing new to write
            self._write_skipped()

    def _write_skipped(self) -> None:
        if not is_main_process() or not (self.skipped or self.skipped_csv.exists()):
            return
        lines = ["image_id,file,reason"] + [",".join(_csv_field(v) for v in row) for row in self.skipped]
        atomic_write_text(self.skipped_csv, "\n".join(lines) + "\n")


def state_bytes(snapshot: dict, optimizer: torch.optim.Optimizer) -> int:
    """About how many bytes a training state takes on disk: each tensor of the snapshot once (torch.save
    stores shared storage once), and two buffers per trained parameter for the optimizer (momentum; Adam's
    two moments), which exist only after the first step."""
    seen: dict[int, int] = {}

    def visit(value: object) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
    visit(snapshot)
    trained = sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"])
    return sum(seen.values()) + 2 * trained


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


def readable_text(text: str) -> str:
    """`text` as valid UTF-8 for a file a person reads: bytes of a file name that are not UTF-8 (which
    Python holds as surrogate escapes) are shown as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _csv_field(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n') else value


@torch.no_grad()
def evaluation_outputs(model: nn.Module, loader: DataLoader, device: torch.device,
                       precision: torch.dtype | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's outputs (float32) and the label vectors of every readable image in an unshuffled `loader`,
    seen through `evaluation_view` in eval mode, and the dataset positions they belong to (unreadable images
    are left out). The model's train or eval mode is as before afterwards."""
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=precision) if precision else nullcontext()
    outputs, truths, kept = [], [], []
    position = 0
    for images, labels, ok in loader:
        kept.append(position + np.flatnonzero(ok.numpy()))
        position += len(ok)
        if not ok.any():
            continue
        with autocast:
            outputs.append(model(evaluation_view(images[ok].to(device), loader.dataset.image_size)).float().cpu())
        truths.append(labels[ok].numpy())
    model.train(was_training)
    if not truths:
        raise InputError("no image of the evaluation split could be read")
    return torch.cat(outputs).numpy(), np.concatenate(truths), np.concatenate(kept)


def predict(model: nn.Module, loader: DataLoader, device: torch.device, precision: torch.dtype | None,
            multilabel: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and predicted probabilities (sigmoid or softmax over the last axis of the model's output) of
    every readable image in an unshuffled `loader`, and the dataset positions they belong to."""
    logits, truths, kept = evaluation_outputs(model, loader, device, precision)
    logits = torch.from_numpy(logits)
    return truths, (logits.sigmoid() if multilabel else logits.softmax(dim=-1)).numpy(), kept
