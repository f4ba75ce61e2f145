"""The one training loop, shared by pretraining and downstream training.

Pretraining and downstream training differ only in the `step_loss` function, the end-of-epoch
callback and the snapshot of their own weights they hand to `Trainer`.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch.utils.data import DataLoader

from mirl.checkpoints import CheckpointStore, random_state, restore_random_state
from mirl.datasets import ImageDataset
from mirl.distributed import any_rank, gather_objects, is_main_process, rank
from mirl.errors import DataError
from mirl.loaders import EpochSampler, readable_batch
from mirl.run_files import RunLog, atomic_write_text, csv_field, progress, readable_text

# a training step's loss, alone or with numbers to log beside it
StepLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]]


class StepHooks(Protocol):
    """What a network may do around the optimizer step (a `PretrainingMethod` has both)."""

    def after_backward(self) -> None: ...

    def after_optimizer_step(self) -> None: ...


class TrainingStep:
    """One optimisation step: `step_loss(images, labels)` under autocast (the loss, or the loss and numbers to
    log), backward (scaled for fp16), the network's `after_backward` hook on the final, unscaled gradients, the
    optimizer and scheduler, then its `after_optimizer_step` hook. A non-finite loss stops training before it
    corrupts the weights."""

    def __init__(self, step_loss: StepLoss, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None, device: torch.device,
                 precision: torch.dtype | None, hooks: StepHooks | None = None) -> None:
        self.step_loss, self.optimizer, self.scheduler, self.hooks = step_loss, optimizer, scheduler, hooks
        self.device, self.precision = device, precision
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
        self.steps = 0
        self.scalars: dict[str, float] = {}  # what the last step's loss function gave to log besides the loss

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.autocast(self.device.type, dtype=self.precision) if self.precision else nullcontext():
            loss = self.step_loss(images, labels)
        loss, scalars = loss if isinstance(loss, tuple) else (loss, {})
        value = loss.item()
        if any_rank(not math.isfinite(value), self.device):  # every rank stops together
            raise FloatingPointError(f"the loss became {value} at step {self.steps + 1}; "
                                     "lower the learning rate or use --precision fp32")
        self.scalars = {name: float(number) for name, number in scalars.items()}
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.hooks is not None:
            self.scaler.unscale_(self.optimizer)  # a hook that clips sees the true gradients
            self.hooks.after_backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.hooks is not None:
            self.hooks.after_optimizer_step()
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
    `save_every` steps, at an epoch's end when `save_minutes` have passed since the last save, after the last
    epoch and when Ctrl-C or SIGTERM arrives; `restore` continues from one
    exactly. `snapshot()` gives the caller's part of a state (weights and what it needs to reload them).
    """

    def __init__(self, step_loss: StepLoss, loader: DataLoader,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 device: torch.device, precision: torch.dtype | None, store: CheckpointStore, save_every: int,
                 snapshot: Callable[[], dict], loss_terms: int = 1, save_minutes: float = 0.0,
                 hooks: StepHooks | None = None) -> None:
        if not isinstance(loader.sampler, EpochSampler):
            raise ValueError("the training loader must draw its order from an EpochSampler (make_loader shuffle)")
        self.step = TrainingStep(step_loss, optimizer, scheduler, device, precision, hooks)
        self.loader, self.sampler = loader, loader.sampler
        self.store, self.save_every, self.snapshot = store, save_every, snapshot
        # an epoch's end saves only when this long has passed since the last save: a 100 MB state after every
        # one-second epoch is disk traffic, not safety (the last epoch and a stop signal always save)
        self.save_seconds = 60 * save_minutes
        self.saved_at = time.monotonic()
        self.device = device
        # the loss is a sum of this many independent terms (a linear probe's grid of heads): shown as their mean
        self.loss_terms = loss_terms
        self.epoch, self.batch = 0, 0  # the next batch to train: `batch` batches of `epoch` are done
        self.last_loss: float | None = None  # the mean training loss of the last epoch trained
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
        self.saved_at = time.monotonic()
        return self.store.save(self.state(), self.epoch, self.batch)

    def fit(self, epochs: int, log: RunLog, end_of_epoch: Callable[[int], dict[str, float]],
            train_mode: Callable[[], None]) -> None:
        """Train up to `epochs` epochs; `end_of_epoch(epoch)` returns numbers for the progress report.

        Progress bars are drawn when stderr is a terminal; when stdout is not one (a log file, a cluster
        job), each epoch also ends with one plain line there instead of cursor escapes."""
        batch_size = self.loader.batch_size
        lines = is_main_process() and not sys.stdout.isatty()
        log.step = self.step.steps
        pace = Pace(self.step.steps) if is_main_process() else Pace(None)
        epoch_bar = progress(range(self.epoch, epochs), desc="epochs", unit="epoch", initial=self.epoch, total=epochs)
        with StopSignals() as stop:
            for epoch in epoch_bar:
                self.epoch = epoch
                self.sampler.start(epoch, self.batch * batch_size)
                train_mode()
                readable, losses, began = 0, [], time.monotonic()
                batch_bar = progress(self.loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                                     initial=self.batch, total=self.batch + len(self.loader))
                for position, (images, labels, ok) in enumerate(batch_bar):
                    self.batch += 1
                    readable += int(ok.sum())
                    if not ok.all():
                        batch = self.sampler.indices[position * batch_size:(position + 1) * batch_size]
                        unreadable = [i for i, good in zip(batch, ok.tolist()) if not good]
                        self.note_unreadable(self.loader.dataset, unreadable)
                    # BatchNorm and contrastive pairs need at least two images; every rank skips together
                    if not any_rank(int(ok.sum()) < 2, self.device):
                        loss = self._train_step(*readable_batch(images, labels, ok)) / self.loss_terms
                        losses.append(loss)
                        log.step = self.step.steps
                        log.scalar("train/loss", loss)
                        for name, number in self.step.scalars.items():
                            log.scalar(f"train/{name}", number)
                        rates = [group["lr"] for group in self.step.optimizer.param_groups]
                        for number, rate in enumerate(rates):  # one tag per rate when groups differ
                            log.scalar("train/lr" if len(set(rates)) == 1 else f"train/lr/{number}", rate)
                        batch_bar.set_postfix(loss=f"{loss:.4f}", skipped=len(self.skipped))
                        if self.save_every and self.step.steps % self.save_every == 0:
                            self.save()
                        pace.after_step(self.step.steps, epochs * len(self.loader))
                    if any_rank(stop.received is not None, self.device):
                        path = self.save()
                        raise TrainingInterrupted(f"{stop.received or 'a stop signal'} received: saved the state after "
                                                  f"epoch {epoch} batch {self.batch} to {path}; "
                                                  "continue with --resume auto")
                if readable == 0 and self.skipped:
                    raise DataError(f"none of the {len(self.sampler.indices)} images of epoch {epoch + 1} could be "
                                    f"read; the reasons are in {self.skipped_csv}")
                log.scalar("data/skipped_images", len(self.skipped))
                self.last_loss = sum(losses) / len(losses) if losses else self.last_loss
                summary = {k: v for k, v in end_of_epoch(epoch).items() if v is not None}
                self.epoch, self.batch = epoch + 1, 0
                if epoch + 1 == epochs or time.monotonic() - self.saved_at >= self.save_seconds:
                    self.save()
                epoch_bar.set_postfix({k: f"{v:.4f}" for k, v in summary.items()}, skipped=len(self.skipped))
                if lines:
                    numbers = "".join(f"  {k} {v:.4f}" for k, v in summary.items())
                    loss_text = "-" if self.last_loss is None else f"{self.last_loss:.4f}"
                    rates = sorted({group["lr"] for group in self.step.optimizer.param_groups})
                    rate_text = f"{rates[0]:.4g}" if len(rates) == 1 else f"{rates[0]:.4g} to {rates[-1]:.4g}"
                    print(f"epoch {epoch + 1}/{epochs}  loss {loss_text}  lr {rate_text}{numbers}  "
                          f"skipped {len(self.skipped)}  {time.monotonic() - began:.0f} s", flush=True)

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
        lines = ["image_id,file,reason"] + [",".join(csv_field(v) for v in row) for row in self.skipped]
        atomic_write_text(self.skipped_csv, "\n".join(lines) + "\n")


class Pace:
    """Says once, after the first steps, how long the run will take at their pace: the first WARMUP steps
    (slower: allocation, first kernels) are not timed, the next TIMED ones are."""

    WARMUP, TIMED = 3, 10

    def __init__(self, first_step: int | None) -> None:
        self.first_step, self.started = first_step, None

    def after_step(self, steps: int, total_steps: int) -> None:
        if self.first_step is None or total_steps - steps < self.TIMED:
            return
        if steps == self.first_step + self.WARMUP:
            self.started = time.monotonic()
        elif steps == self.first_step + self.WARMUP + self.TIMED and self.started is not None:
            seconds = (time.monotonic() - self.started) / self.TIMED * (total_steps - steps)
            shown = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
            print(f"expected: about {shown} for the {total_steps - steps:,} steps left, at the pace of the first "
                  "steps (evaluation passes come on top)", flush=True)
            self.first_step = None


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
