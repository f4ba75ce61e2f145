"""Self-supervised pretraining with any registered method (`mirl.models.METHODS`) and its paper's defaults.

Labels are never read for training. When the data has a label CSV, the test split is held out so
the downstream evaluation stays honest; a plain folder of images is used whole.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn

from mirl import distributed
from mirl.augment import BatchAugment, recipe_for
from mirl.cache import open_cache
from mirl.checkpoints import check_same_run, reading_state
from mirl.datasets import DatasetDescription, ImageDataset, ImageRecord
from mirl.errors import InputError
from mirl.loaders import make_loader
from mirl.models import METHODS, MethodSpec
from mirl.monitor import KnnMonitor, sample_records
from mirl.optim import LARS, build_scheduler, lars_parameter_groups
from mirl.positives import PairedImages, partner_candidates
from mirl.run_files import RunLog, open_run
from mirl.runtime import prepare_network, resolve_device, resolve_precision, seed_everything
from mirl.splits import load_splits
from mirl.training import Trainer


def pretraining_records(description: DatasetDescription,
                        args: argparse.Namespace) -> tuple[list[ImageRecord], dict[str, list[ImageRecord]] | None]:
    """Every image the encoder may see: all of them, minus the test split's images and patients when
    the data has labels; then also the labelled train and val images the kNN monitor uses."""
    description.check_root(args.data_root)
    labelled = description.find_labelled(args.data_root) if description.has_labels(args.data_root) else None
    records = description.pretraining_images(args.data_root, labelled)
    if not records:
        raise InputError(f"no images found under {args.data_root}; {description.data_hint}")
    monitor_sets = None
    if labelled is None and args.supervised:
        raise InputError(f"--supervised needs labelled data, but {args.data_root} has no labels; "
                         f"{description.data_hint}")
    if labelled is not None:
        splits = load_splits(description, labelled, args.split_dir)
        by_id = {r.image_id: r for r in labelled}
        monitor_sets = {name: [by_id[i] for i in splits[name]] for name in ("train100F", "val")}
        test = set(splits["test"])
        test_patients = {r.group for r in labelled if r.image_id in test and r.group is not None}
        records = [r for r in records if r.image_id not in test and r.group not in test_patients]
        if args.supervised:
            records = label_aware_records(records, usable_labels(labelled, records, splits, args.fraction),
                                          len(description.classes))
    share = len(records) // distributed.world_size()  # each process's part of an epoch
    if share < args.batch_size:
        raise InputError(f"--batch-size {args.batch_size} is more than the {share} pretraining images of each of "
                         f"{distributed.world_size()} process(es): an epoch would have no full batch; lower it")
    return records, monitor_sets


def usable_labels(labelled: list[ImageRecord], records: list[ImageRecord], splits: dict[str, list[str]],
                  fraction: int) -> dict[str, np.ndarray]:
    """The labels label-aware pretraining may use, by image id: those of the fraction's split only.

    Pretraining images outside every split (ACDC's cine frames) carry their patient's diagnosis when
    that patient's labelled slices are in the fraction's split: the label is the patient's, and the
    patient is already a labelled one. Val and test labels are never used."""
    train = set(splits[f"train{fraction}F"])
    in_splits = {image_id for split in splits.values() for image_id in split}
    by_patient = {r.group: r.labels for r in labelled if r.image_id in train and r.group is not None}
    usable = {r.image_id: r.labels for r in labelled if r.image_id in train}
    usable.update({r.image_id: by_patient[r.group] for r in records
                   if r.image_id not in in_splits and r.group in by_patient})
    return usable


def label_aware_records(records: list[ImageRecord], usable: dict[str, np.ndarray],
                        num_classes: int) -> list[ImageRecord]:
    """Records for label-aware MoCo: images with usable labels keep them, with one more class, "no
    finding", for a labelled image without any (two normal scans are alike too; an all-zero vector
    would overlap nothing); every other image is all zero: unlabelled."""
    def label_vector(record: ImageRecord) -> np.ndarray:
        if record.image_id not in usable:
            return np.zeros(num_classes + 1, dtype=np.float32)
        labels = np.asarray(usable[record.image_id], dtype=np.float32)
        return np.append(labels, np.float32(labels.sum() == 0))
    return [replace(r, labels=label_vector(r)) for r in records]


def learning_rate(method: MethodSpec, args: argparse.Namespace) -> float:
    """`--lr`, else the method's rate per 256 images scaled linearly to the global batch."""
    return args.lr if args.lr is not None else method.lr_per_256 * args.batch_size * distributed.world_size() / 256


def build_optimizer(model: nn.Module, method: MethodSpec, args: argparse.Namespace) -> torch.optim.Optimizer:
    lr = learning_rate(method, args)
    if args.optimizer == "lars":
        return LARS(lars_parameter_groups(model), lr=lr, weight_decay=method.weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for every parameter's update instead of a few calls per parameter
    return torch.optim.SGD(trainable, lr=lr, momentum=0.9, weight_decay=method.weight_decay, fused=True)


def pretrain(description: DatasetDescription, method_name: str, args: argparse.Namespace) -> None:
    """Pretrain an encoder. `checkpoint.pth` is always the newest training state; its `encoder` loads
    into the plain torchvision model. `--resume` continues a run exactly where a state left it."""
    method = METHODS[method_name]
    flags = dict(vars(args))  # as given, before anything is settled from the data: --config relaunches with them
    args = argparse.Namespace(**flags)  # what this run settles (architecture, queue size) never reaches the caller's
    device = resolve_device(args.device)
    distributed.init_from_environment(device)  # first: the run's identity holds the world size
    store, resume_from, resumed = open_run(args.output_dir, args.keep, publish=True, resume=args.resume)
    if resumed is not None and args.arch is None:
        args.arch = resumed.get("arch")
    args.arch = args.arch or "resnet50"
    identity = {"method": method.name, "dataset": description.name, "arch": args.arch,
                "batch_size": args.batch_size, "image_size": args.image_size, "world_size": distributed.world_size(),
                "supervised_fraction": args.fraction if args.supervised else None,
                # the schedule follows from these: a resumed run with others would silently train another one
                "lr": learning_rate(method, args), "epochs": args.epochs, "positives": args.positives}
    if resumed is not None:  # before listing the data: a state of another run is refused at once
        check_same_run(resumed, identity, resume_from)
    precision = resolve_precision(args.precision, device)
    records, monitor_sets = pretraining_records(description, args)
    settled = method.prepare(args, len(records))  # what follows from the number of images (MoCo's queue size)
    identity.update(settled)
    if resumed is not None:
        check_same_run(resumed, settled, resume_from)

    seed_everything(args.seed, args.deterministic)
    supervised = args.supervised
    # label-aware MoCo: the label vectors gain a "no finding" class, and the queue keeps them
    queue_label_dim = len(description.classes) + 1 if supervised else 0
    cache = open_cache(description, args.data_root, args.image_size, args.cache, args.workers) if args.cache else None
    dataset = ImageDataset(records, args.image_size, queue_label_dim or len(description.classes), cache)
    partners = None
    if args.positives != "views":  # the two views of a pair from two images of one study or patient
        partners = partner_candidates(description, records, args.positives)
        dataset = PairedImages(dataset)
    loader = make_loader(dataset, args.batch_size, args.workers, shuffle=True, drop_last=True, seed=args.seed,
                         partners=partners)
    total_steps = args.epochs * len(loader)
    model = prepare_network(method.build(args, queue_label_dim, total_steps), device, args.channels_last,
                            args.compile)
    core = model
    if resumed is not None:
        with reading_state(resume_from):
            core.load_state_dict(resumed["model"])
    if distributed.is_distributed():
        # every rank enqueues the same gathered keys, so the queue (32 MB at K = 65,536) is not broadcast each
        # step; each rank's BatchNorm keeps its own running statistics, as under fb/moco, and rank 0's are saved
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                    broadcast_buffers=False)
    optimizer = build_optimizer(model, method, args)
    warmup = min(method.warmup_epochs * len(loader), total_steps // 10)
    scheduler = build_scheduler(optimizer, method.schedule, total_steps, warmup)
    style = args.augment or ("grey" if description.grayscale else "paper")
    augments = [BatchAugment(recipe_for(recipe, style), args.image_size) for recipe in method.recipes]

    log = RunLog(args.output_dir, resumed_at_step=resumed["steps"] + 1 if resumed is not None else None)
    config = {**vars(args), "flags": flags, "method": method.name, "dataset": description.name,
              "images": len(records),
              "images_with_a_partner": sum(map(bool, partners)) if partners is not None else None,
              "device": str(device), "precision": str(precision or "fp32"), "augment": style,
              "world_size": distributed.world_size(), "resumed_from": resume_from,
              "labelled_images": sum(bool(r.labels.any()) for r in records) if supervised else 0}
    log.json("config.json", config)

    def step_loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # two independent views of each image, or of each pair's two images
        views = tuple(augment(images if partners is None else images[:, i]) for i, augment in enumerate(augments))
        loss, _ = model(*views, labels) if supervised else model(*views)
        return loss

    monitor = None
    if monitor_sets and args.knn_images > 0 and distributed.is_main_process():
        monitor = KnnMonitor(description, sample_records(monitor_sets["train100F"], args.knn_images, args.seed),
                             sample_records(monitor_sets["val"], args.knn_images // 2, args.seed), args.image_size,
                             device, precision, args.batch_size, args.workers, cache)
    latest = {"monitor": resumed.get("monitor", {}) if resumed is not None else {}}

    def snapshot() -> dict:
        return {"method": method.name, "arch": args.arch, "dataset": description.name, "run": identity,
                "supervised_fraction": identity["supervised_fraction"],
                "encoder": core.feature_encoder().state_dict(), "model": core.state_dict(),
                "monitor": latest["monitor"], "config": {k: str(v) for k, v in config.items()}}

    def end_of_epoch(epoch: int) -> dict[str, float]:
        latest["monitor"] = monitor(core.feature_encoder()) if monitor else {}
        for name, value in latest["monitor"].items():
            log.scalar(f"monitor/{name}", value, epoch)
        return latest["monitor"]

    trainer = Trainer(step_loss, loader, optimizer, scheduler, device, precision, store, args.save_every, snapshot)
    if resumed is not None:
        with reading_state(resume_from):
            trainer.restore(resumed, resume_from)
    trainer.fit(args.epochs, log, end_of_epoch, train_mode=model.train)
    log.close()
