"""Downstream training on a label fraction: fine-tune the pretrained encoder, train a linear probe on
it frozen (MoCo's linear protocol), or train a supervised torchvision ResNet as the baseline.

The model selected is the epoch with the best validation metric; `metrics.json` holds its test and
validation metrics.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mirl import distributed
from mirl.augment import RECIPES, BatchAugment
from mirl.cache import open_cache
from mirl.checkpoints import CHECKPOINT_NAME, check_same_run, load_checkpoint, reading_state, save_checkpoint
from mirl.datasets import DatasetDescription, ImageDataset, ImageRecord
from mirl.errors import CheckpointError, InputError
from mirl.inference import predict
from mirl.loaders import make_loader
from mirl.metrics import bootstrap_interval, evaluate, primary_metric, reported_metrics
from mirl.models import ENCODERS, METHODS, MethodSpec, build_classifier
from mirl.optim import build_scheduler
from mirl.run_files import RunLog, open_run
from mirl.runtime import prepare_network, resolve_device, resolve_precision, seed_everything
from mirl.splits import load_splits
from mirl.training import Trainer

# MoCo's linear protocol (SGD, no weight decay, x0.1 at 60 % and 80 % of training), with the learning rate
# chosen on the validation split: one head per rate of PROBE_LRS trains on the same frozen features, so
# the choice costs one run. The grid holds the paper's 30, which suits softmax over ImageNet features,
# and the small rates a multi-label sigmoid head needs (lr 30 saturated it on RSNA sample data).
PROBE_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
# Fine-tuning: AdamW, linear warm-up over the first tenth of the steps, then cosine. The pretrained
# encoder learns at FINETUNE_ENCODER_LR_SCALE x the head's rate (`--encoder-lr-scale`). Chosen on the
# ISIC validation split at 1 % of labels (MoCo v2, resnet18, 64 px): scale 1 gave val balanced accuracy
# 0.296, scale 0.1 gave 0.251 (macro AUC 0.740 and 0.763), so one rate for all layers is the default.
FINETUNE_LR = 1e-3
FINETUNE_ENCODER_LR_SCALE = 1.0
FINETUNE_WARMUP = 0.1
FROZEN_EPOCHS, FINETUNE_EPOCHS = 100, 30
# a 1 % split of a small dataset is one batch: unless --epochs is given, its epochs pass over the split
# several times, so that every run takes at least this many optimizer steps
MIN_STEPS = 200
EVALUATIONS = 15  # validation passes per run at most (every epoch for short runs)


class ProbeGrid(nn.Module):
    """Linear heads side by side on the same features, one per learning rate; outputs B x heads x classes."""

    def __init__(self, in_features: int, num_classes: int, heads: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_features, num_classes) for _ in range(heads))
        for head in self.heads:  # MoCo's linear protocol: N(0, 0.01) weights, zero bias
            nn.init.normal_(head.weight, mean=0.0, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(features) for head in self.heads], dim=1)


def with_chosen_head(state: dict[str, torch.Tensor], prefix: str, head: int) -> dict[str, torch.Tensor]:
    """A classifier state dict with the grid at `prefix` replaced by its head number `head`, under the
    plain torchvision names."""
    plain = {k: v for k, v in state.items() if not k.startswith(f"{prefix}heads.")}
    for name in ("weight", "bias"):
        plain[f"{prefix}{name}"] = state[f"{prefix}heads.{head}.{name}"]
    return plain


def pretrained_encoder(method: MethodSpec, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The encoder weights of a pretraining checkpoint, checked to come from `method` and `--arch`."""
    if not args.pretrained.is_file():
        raise CheckpointError(f"no checkpoint at {args.pretrained}; run {method.script} first "
                              "or pass --pretrained PATH (or --resnet for the supervised baseline)")
    checkpoint = load_checkpoint(args.pretrained)
    found = checkpoint.get("method") if isinstance(checkpoint, dict) else None
    if found != method.name or "encoder" not in checkpoint:
        origin = f"a {METHODS[found].title} checkpoint" if found in METHODS else "not a MIRL pretraining checkpoint"
        raise CheckpointError(f"{args.pretrained} is {origin}; this script needs one written by {method.script}")
    arch, encoder = checkpoint.get("arch"), checkpoint["encoder"]
    if not isinstance(arch, str) or arch not in ENCODERS:
        raise CheckpointError(f"{args.pretrained} names no known architecture ({str(arch)[:40]!r}; known: "
                              f"{', '.join(sorted(ENCODERS))})")
    if not isinstance(encoder, dict) or not all(isinstance(v, torch.Tensor) for v in encoder.values()):
        raise CheckpointError(f"{args.pretrained}: its encoder is not a mapping of names to tensors")
    if args.arch is not None and args.arch != arch:
        raise CheckpointError(f"{args.pretrained} holds a {arch} encoder but --arch is {args.arch}")
    args.arch = arch
    return encoder


def torchvision_weights(path: Path, arch: str) -> dict[str, torch.Tensor]:
    """A local torchvision state dict for --init-weights, without its ImageNet classifier."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a torchvision state dict (a mapping of names to tensors)")
    return {k: v for k, v in state.items() if not k.startswith(ENCODERS[arch].classifier_prefix)}


def load_encoder(model: nn.Module, encoder: dict[str, torch.Tensor], source: Path, arch: str) -> None:
    """Load encoder weights into a torchvision classifier; only its new classifier may be left out."""
    head = ENCODERS[arch].classifier_prefix
    try:
        missing, unexpected = model.load_state_dict(encoder, strict=False)
    except RuntimeError as error:
        raise CheckpointError(f"{source} does not fit the model: {str(error).splitlines()[1].strip()}") from None
    if unexpected or any(not k.startswith(head) for k in missing):
        raise CheckpointError(f"{source} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def records_of(split: list[str], by_id: dict[str, ImageRecord]) -> list[ImageRecord]:
    return [by_id[image_id] for image_id in split]


def downstream(description: DatasetDescription, method_name: str, args: argparse.Namespace) -> None:
    """Train and evaluate a classifier on `--fraction` % of the labels; writes metrics.json and checkpoint.pth."""
    method = METHODS[method_name]
    flags = dict(vars(args))  # as given, before anything is settled: --config relaunches with them
    args = argparse.Namespace(**flags)  # what this run settles (architecture, epochs) never reaches the caller's
    if args.init_weights is not None and not args.resnet:
        raise InputError("--init-weights goes with --resnet; without it the encoder comes from --pretrained")
    device = resolve_device(args.device)
    distributed.init_from_environment(device)  # first: the run's identity holds the world size
    store, resume_from, resumed = open_run(args.output_dir, args.keep, publish=False, resume=args.resume)
    encoder, source = None, None
    if args.resnet:
        args.arch = args.arch or "resnet50"
        if args.init_weights is not None:
            encoder, source = torchvision_weights(args.init_weights, args.arch), args.init_weights
    else:
        encoder, source = pretrained_encoder(method, args), args.pretrained
    mode = "resnet" if args.resnet else ("frozen" if args.frozen else "finetune")
    identity = {"method": "supervised" if args.resnet else method.name, "mode": mode, "dataset": description.name,
                "arch": args.arch, "fraction": args.fraction, "batch_size": args.batch_size,
                "image_size": args.image_size, "world_size": distributed.world_size(),
                # the schedule follows from these: a resumed run with others would silently train another one
                "lr": args.lr, "epochs": args.epochs, "encoder_lr_scale": args.encoder_lr_scale}
    if resumed is not None:
        check_same_run(resumed, identity, resume_from)
    precision = resolve_precision(args.precision, device)
    description.check_root(args.data_root)
    records = description.find_labelled(args.data_root)
    splits = load_splits(description, records, args.split_dir)
    by_id = {r.image_id: r for r in records}
    train, val, test = (records_of(splits[name], by_id) for name in (f"train{args.fraction}F", "val", "test"))
    if len(train) < 2:
        raise InputError(f"the {args.fraction} % split has {len(train)} image; pick a larger --fraction")

    seed_everything(args.seed, args.deterministic)
    classes = description.classes
    architecture = ENCODERS[args.arch]
    model = build_classifier(args.arch, len(classes))
    if encoder is not None:
        load_encoder(model, encoder, source, args.arch)
    head = architecture.classifier_prefix
    output_prefix = architecture.output_prefix(model)
    probe_lrs = (args.lr,) if args.lr else PROBE_LRS
    if args.frozen:
        for p in model.parameters():
            p.requires_grad = False
        architecture.replace_output_layer(model, ProbeGrid(architecture.output_layer(model).in_features,
                                                           len(classes), len(probe_lrs)))
    model = prepare_network(model, device, args.channels_last, args.compile)
    # `network` trains (wrapped for DDP under torchrun); `model` is the plain torchvision model it wraps
    network = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if distributed.is_distributed() else model
    if args.frozen:
        grid = architecture.output_layer(model)
        optimizer = torch.optim.SGD([{"params": list(h.parameters()), "lr": lr} for h, lr in zip(grid.heads, probe_lrs)],
                                    lr=probe_lrs[0], momentum=0.9, weight_decay=0.0)
    else:
        head_lr = args.lr or FINETUNE_LR
        # a randomly initialised encoder has no features to protect: it always trains at the head's rate
        encoder_scale = args.encoder_lr_scale if args.encoder_lr_scale is not None else \
            (1.0 if encoder is None else FINETUNE_ENCODER_LR_SCALE)
        groups = [{"params": [p for n, p in model.named_parameters() if n.startswith(head)], "lr": head_lr},
                  {"params": [p for n, p in model.named_parameters() if not n.startswith(head)],
                   "lr": head_lr * encoder_scale}]
        optimizer = torch.optim.AdamW(groups, lr=head_lr, weight_decay=1e-4)

    cache = open_cache(description, args.data_root, args.image_size, args.cache, args.workers) if args.cache else None

    def dataset(split: list[ImageRecord]) -> ImageDataset:
        return ImageDataset(split, args.image_size, len(classes), cache)

    batch_size = min(args.batch_size, len(train))
    passes = 1
    if not args.epochs:
        args.epochs = FROZEN_EPOCHS if args.frozen else FINETUNE_EPOCHS
        passes = math.ceil(math.ceil(MIN_STEPS / args.epochs) * batch_size / len(train))
    train_loader = make_loader(dataset(train), batch_size, args.workers, shuffle=True, drop_last=False,
                               seed=args.seed, passes=passes)
    val_loader, test_loader = (make_loader(dataset(s), args.batch_size, args.workers, shuffle=False, drop_last=False,
                                           seed=args.seed) for s in (val, test))
    total_steps = args.epochs * len(train_loader)
    warmup_steps = 0 if args.frozen else round(FINETUNE_WARMUP * total_steps)
    scheduler = build_scheduler(optimizer, "step" if args.frozen else "cosine", total_steps, warmup_steps)
    augment = BatchAugment(RECIPES["linear" if args.frozen else "finetune"], args.image_size)
    evaluate_every = max(1, args.epochs // EVALUATIONS)
    log = RunLog(args.output_dir, resumed_at_step=resumed["steps"] + 1 if resumed is not None else None)
    config = {**vars(args), "flags": flags, "method": identity["method"], "mode": mode,
              "steps": total_steps,
              "passes_per_epoch": passes,
              "warmup_steps": warmup_steps, "optimizer": type(optimizer).__name__,
              # the linear probe: one rate per head of the grid; fine-tuning: the head's, then the encoder's
              "learning_rates": [group["initial_lr"] for group in optimizer.param_groups],
              "dataset": description.name, "device": str(device), "precision": str(precision or "fp32"),
              "train_images": len(train), "val_images": len(val), "test_images": len(test),
              "resumed_from": resume_from}
    log.json("config.json", config)

    def step_loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = network(augment(images)).float()
        if args.frozen:  # B x heads x classes: the sum of each head's own mean loss, so each gets its own gradient
            heads = logits.shape[1]
            if description.multilabel:
                return heads * F.binary_cross_entropy_with_logits(logits, labels[:, None].expand_as(logits))
            return heads * F.cross_entropy(logits.flatten(0, 1), labels.argmax(dim=1).repeat_interleave(heads))
        if description.multilabel:
            return F.binary_cross_entropy_with_logits(logits, labels)
        return F.cross_entropy(logits, labels.argmax(dim=1))

    selection = primary_metric(description.multilabel)

    def split_metrics(split: list[ImageRecord], truth: np.ndarray, probability: np.ndarray, kept: np.ndarray,
                      interval: bool = False) -> dict:
        """Metrics of one split's predictions; with `interval`, a patient-bootstrap 95 % interval of the
        headline ones. Images that could not be read are counted (`unreadable_images`) and listed in
        skipped.csv, never silently left out."""
        patients = [description.patient_group(split[i]) or split[i].image_id for i in kept] \
            if description.patient_vote or interval else None
        metrics = evaluate(truth, probability, classes, description.multilabel,
                           patients if description.patient_vote else None)
        if interval:
            metrics["ci95"] = {
                name: bootstrap_interval(truth, probability, patients,
                                         lambda y, p, name=name: evaluate(y, p, classes, description.multilabel)[name])
                for name in reported_metrics(description.multilabel)}
        metrics["unreadable_images"] = len(split) - len(kept)
        return metrics

    def predictions(loader: torch.utils.data.DataLoader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        truth, probability, kept = predict(model, loader, device, precision, description.multilabel)
        if len(kept) < len(loader.dataset):
            trainer.note_unreadable(loader.dataset, sorted(set(range(len(loader.dataset))) - set(kept.tolist())))
        return truth, probability, kept

    def evaluate_split(split: list[ImageRecord], loader: torch.utils.data.DataLoader, interval: bool = False) -> dict:
        return split_metrics(split, *predictions(loader), interval)

    def score_of(metrics: dict) -> float:
        return metrics[selection] if metrics[selection] is not None else -metrics.get("weighted_log_loss", 0.0)

    best = {"score": -np.inf, "state": None, "epoch": 0, "lr": None}

    def end_of_epoch(epoch: int) -> dict[str, float]:
        if (epoch + 1) % evaluate_every and epoch + 1 != args.epochs:
            return {}
        truth, probability, kept = predictions(val_loader)
        # the linear probe's grid: one set of metrics per head, the best head speaks for the epoch
        per_head = [split_metrics(val, truth, probability[:, h], kept) for h in range(probability.shape[1])] \
            if args.frozen else [split_metrics(val, truth, probability, kept)]
        chosen = int(np.argmax([score_of(m) for m in per_head]))
        metrics = per_head[chosen]
        for name in ("auc_macro", "accuracy", "balanced_accuracy", "patient_accuracy", "weighted_log_loss"):
            if metrics.get(name) is not None:
                log.scalar(f"val/{name}", metrics[name], epoch)
        if score_of(metrics) > best["score"]:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best.update(score=score_of(metrics), epoch=epoch + 1,
                        state=with_chosen_head(state, output_prefix, chosen) if args.frozen else state,
                        lr=probe_lrs[chosen] if args.frozen else optimizer.defaults["lr"])
        return {f"val_{selection}": metrics[selection]}

    def train_mode() -> None:
        # the linear protocol keeps the frozen encoder's BatchNorm statistics fixed
        model.train(not args.frozen)

    def snapshot() -> dict:
        return {"method": config["method"], "mode": mode, "arch": args.arch, "dataset": description.name,
                "run": identity, "model": model.state_dict(), "best": dict(best)}

    trainer = Trainer(step_loss, train_loader, optimizer, scheduler, device, precision, store, args.save_every,
                      snapshot)
    if resumed is not None:
        with reading_state(resume_from):
            model.load_state_dict(resumed["model"])
            best.update(resumed["best"])
            trainer.restore(resumed, resume_from)
    trainer.fit(args.epochs, log, end_of_epoch, train_mode)
    if args.frozen:  # back to the plain torchvision classifier, holding the head chosen on validation
        architecture.replace_output_layer(model, nn.Linear(grid.heads[0].in_features, len(classes)).to(device))
    model.load_state_dict(best["state"])
    if args.frozen:
        changed = [k for k, v in model.state_dict().items() if not k.startswith(head) and
                   not torch.equal(v.cpu(), encoder[k])]
        if changed:
            raise RuntimeError(f"the frozen encoder changed during linear training ({changed[:3]})")
    results = {"test": evaluate_split(test, test_loader, interval=True), "val": evaluate_split(val, val_loader)}
    results.update(best_epoch=best["epoch"], selected_by=f"val {selection}", lr=best["lr"], mode=mode,
                   fraction=args.fraction, arch=args.arch, method=config["method"], epochs=args.epochs)
    log.json("metrics.json", results)
    for name in ("auc_macro", "accuracy", "balanced_accuracy", "patient_accuracy"):
        if results["test"].get(name) is not None:
            log.scalar(f"test/{name}", results["test"][name], best["epoch"])
    save_checkpoint({"method": config["method"], "mode": mode, "arch": args.arch, "dataset": description.name,
                     "classes": list(classes), "model": model.state_dict(), "best_epoch": best["epoch"]},
                    args.output_dir / CHECKPOINT_NAME)
    log.close()
    if distributed.is_main_process():
        print(f"test {selection}: {results['test'][selection]}  (val {selection} {results['val'][selection]}, "
              f"best epoch {best['epoch']}) -> {args.output_dir / 'metrics.json'}")
