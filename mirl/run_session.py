"""One run session: the steps every training run takes, pretraining and downstream alike, named once.

A run starts its device and process group; opens its output folder (locked, resumable); settles its identity
and refuses a resumed state of another run, once before its data is listed and once after (what only the data
settles); opens the decoded-image cache before seeding; wraps its network for DistributedDataParallel; writes
`config.json`; trains with the one loop, continuing an interrupted state; and publishes, after which its
training states go unless kept. `mirl.pretrain.pretrain` and `mirl.downstream.downstream` are these steps with
what differs between them in between.
"""
from __future__ import annotations

import csv
import sys
from typing import Callable, Mapping

import torch
import torch.nn as nn

from mirl import distributed
from mirl.cache import open_cache
from mirl.checkpoints import check_same_run, reading_state, writing
from mirl.config import RunConfig, identity_digest
from mirl.datasets import DatasetDescription, DecodedImages, ImageRecord
from mirl.datasets.volumes import left_out_slices
from mirl.run_files import RunLog, open_run, provenance
from mirl.runtime import OtherProcessesLoad, precision_name, resolve_device, resolve_precision, seed_everything
from mirl.spatial import InputSpace
from mirl.training import Trainer

LEFT_OUT_FILE = "left_out.csv"  # slices a volume run's series could not use, and why


class RunSession:
    """The shared steps of one run of `config`, in the order a run takes them. `publish`: the run's newest state
    is its published checkpoint (pretraining) rather than a separate final file (downstream)."""

    def __init__(self, config: RunConfig, publish: bool) -> None:
        self.device = resolve_device(config.device)
        distributed.init_from_environment(self.device)  # first: the run's identity holds the world size
        self._load = OtherProcessesLoad()  # over the start-up: were the cores already busy?
        self.store, self.resume_from, self.resumed = open_run(config.output_dir, config.keep, publish=publish,
                                                              resume=config.resume)
        self.precision: torch.dtype | None = resolve_precision(config.precision, self.device)
        self.identity: dict[str, object] = {}
        self.log: RunLog | None = None

    def settle_identity(self, identity: Mapping[str, object], unsettled: tuple[str, ...] = ()) -> None:
        """The run's identity as far as it is known before the data is listed; a resumed state of another run is
        refused now, at once (the `unsettled` fields are compared once `add_to_identity` settles them)."""
        self.identity = dict(identity)
        if self.resumed is not None:
            check_same_run(self.resumed, {k: v for k, v in identity.items() if k not in unsettled}, self.resume_from)

    def add_to_identity(self, settled: Mapping[str, object]) -> None:
        """What the run settles once its data is listed (the split files' contents, MoCo's queue size), checked
        against a resumed state too."""
        self.identity.update(settled)
        if self.resumed is not None:
            check_same_run(self.resumed, settled, self.resume_from)

    def cache_then_seed(self, description: DatasetDescription, run: RunConfig,
                        inputs: InputSpace) -> DecodedImages | None:
        """The decoded-image cache (`--cache`, stored as `--codec` says), then the seed: building a cache must not
        move the random streams that the seed sets for training. On a GPU a JPEG store hands its items over
        encoded, and batches decode there (nvJPEG), so the loader's workers only read bytes."""
        cache = None
        if run.cache:
            cache = open_cache(description, run.data_root, inputs, run.cache, run.workers, run.codec)
            cache = cache.decoding_on(self.device if self.device.type == "cuda" else None)
        seed_everything(run.seed, run.deterministic)
        return cache

    def restore_weights(self, load: Callable[[dict], object]) -> None:
        """`load(state)` with a resumed state (the network's weights and what else the caller keeps), reading
        errors named after its file; nothing for a fresh run."""
        if self.resumed is not None:
            with reading_state(self.resume_from):
                load(self.resumed)

    def parallel(self, model: nn.Module, **options: object) -> nn.Module:
        """`model` wrapped for DistributedDataParallel under torchrun (on its own GPU where there is one)."""
        if not distributed.is_distributed():
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **options)

    def write_config(self, config: RunConfig, run: RunConfig, description: DatasetDescription,
                     fields: Mapping[str, object]) -> dict[str, object]:
        """Start the run's log and write `config.json`: the settled run's flags, the flags as given (what
        `--config` relaunches), the run's own `fields`, where it ran, and its identity. Returns the record."""
        resumed_at = self.resumed["steps"] + 1 if self.resumed is not None else None
        self.log = RunLog(run.output_dir, resumed_at_step=resumed_at)
        record = {**run.flags(), "flags": config.flags(), "script": config.script, **fields,
                  "dataset": description.name, "device": str(self.device),
                  "precision": precision_name(self.precision), "world_size": distributed.world_size(),
                  "resumed_from": self.resume_from, "software": provenance(), "identity": self.identity,
                  "run_id": identity_digest(self.identity)}
        self.log.json("config.json", record)
        return record

    def list_left_out(self, records: list[ImageRecord]) -> None:
        """List in `left_out.csv`, and say in one line, the slices the run's volumes left out of their series (a
        size or orientation of their own, a repeated position) and those that follow a gap: never silently
        dropped or filled."""
        rows = left_out_slices(records)
        if not rows or not distributed.is_main_process():
            return
        path = self.store.output_dir / LEFT_OUT_FILE
        with writing(path) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([("volume", "file", "reason"), *rows])
        print(f"warning: {len(rows)} slices were left out of their series or follow a gap ({rows[0][2]}, ...); "
              f"listed in {path}", file=sys.stderr)

    def train(self, trainer: Trainer, epochs: int, end_of_epoch: Callable[[int], dict[str, float]],
              train_mode: Callable[[], None]) -> None:
        """Continue a resumed state (the optimizer, schedule, position and random streams; the weights came with
        `restore_weights`), warn when other processes keep the cores busy, then train up to `epochs`."""
        if self.resumed is not None:
            with reading_state(self.resume_from):
                trainer.restore(self.resumed, self.resume_from)
        if not distributed.is_distributed():  # under torchrun the other ranks keep cores busy by design
            self._load.warn_if_busy()
        trainer.fit(epochs, self.log, end_of_epoch, train_mode)

    def publish(self, keep_states: bool, hparams: Mapping[str, object], final: Mapping[str, object]) -> None:
        """The result is written: remove the training states unless kept, record the hyperparameters with the
        final numbers in TensorBoard, close the log."""
        if not keep_states:
            self.store.remove_states()
        self.log.hparams(dict(hparams), dict(final))
        self.log.close()
