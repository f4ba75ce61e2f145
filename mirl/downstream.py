"""Downstream training on a label fraction: fine-tune the pretrained encoder, train a linear probe on
it frozen (MoCo's linear protocol), or train a supervised torchvision ResNet as the baseline.

The model selected is the epoch with the best validation metric; `metrics.json` holds its test and
validation metrics.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mirl import distributed
from mirl.checkpoints import (
    CHECKPOINT_NAME,
    file_digest,
    load_checkpoint,
    save_checkpoint,
    writing,
)
from mirl.config import DownstreamConfig
from mirl.datasets import DatasetDescription, ImageRecord, image_kinds
from mirl.encoders import check_input_size, load_encoder, local_weights
from mirl.errors import CheckpointError, InputError
from mirl.flags import DEFAULT_ARCH
from mirl.inference import predict
from mirl.loaders import make_loader
from mirl.metrics import bootstrap_interval, evaluate, primary_metric, reported_metrics
from mirl.models import ENCODERS, METHODS, MethodSpec, architecture, build_classifier, known_architecture
from mirl.optim import build_scheduler
from mirl.run_session import RunSession
from mirl.runtime import prepare_network
from mirl.spatial import input_space, settled_inputs
from mirl.splits import load_splits, split_digest, split_files_digest
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
PREDICTIONS_FILE = "test_predictions.npz"  # each readable test image's id, labels and predicted probabilities
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


def pretrained_encoder(method: MethodSpec, config: DownstreamConfig
                       ) -> tuple[str, dict[str, torch.Tensor], dict | None, dict[str, object]]:
    """The architecture and encoder weights of a pretraining checkpoint, checked to come from `method` and
    to match `--arch` when it is given, its record of the data it was pretrained on (None: an older MIRL), and
    the volume grid it was pretrained on (`volume_size`, `voxel_size`; empty for an image encoder)."""
    path = config.pretrained
    if path is None or not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; run {method.script} first "
                              "or pass --pretrained PATH (or --resnet for the supervised baseline)")
    checkpoint = load_checkpoint(path)
    found = checkpoint.get("method") if isinstance(checkpoint, dict) else None
    if found != method.name or "encoder" not in checkpoint:
        origin = f"a {METHODS[found].title} checkpoint" if found in METHODS else "not a MIRL pretraining checkpoint"
        raise CheckpointError(f"{path} is {origin}; this script needs one written by {method.script}")
    arch, encoder = checkpoint.get("arch"), checkpoint["encoder"]
    if not known_architecture(arch):
        raise CheckpointError(f"{path} names no known architecture ({str(arch)[:40]!r}; known: "
                              f"{', '.join(sorted(ENCODERS))}, timm:NAME)")
    if not isinstance(encoder, dict) or not all(isinstance(v, torch.Tensor) for v in encoder.values()):
        raise CheckpointError(f"{path}: its encoder is not a mapping of names to tensors")
    if config.arch is not None and config.arch != arch:
        raise CheckpointError(f"{path} holds a {arch} encoder but --arch is {config.arch}")
    data = checkpoint.get("data")
    grid = {name: checkpoint[name] for name in ("volume_size", "voxel_size") if checkpoint.get(name) is not None}
    return arch, encoder, data if isinstance(data, dict) else None, grid


def check_pretraining_data(config: DownstreamConfig, data: dict | None, test: list[ImageRecord]) -> None:
    """Refuse an encoder pretrained on other data, or with another test split held out (it may have seen
    this run's test images), unless `--transfer` says so on purpose. A checkpoint pretrained with labels
    records its held-out test split; one pretrained on a folder without labels, its folder."""
    if config.transfer or data is None:
        return
    advice = "pass --transfer if it was pretrained on other data on purpose, or --pretrained another checkpoint"
    if data.get("test_split") is not None:
        if data["test_split"] != split_digest([r.image_id for r in test]):
            raise CheckpointError(f"{config.pretrained} was pretrained on other data or with other splits (its "
                                  f"held-out test split is not this run's, so it may have seen these test images; "
                                  f"pretrained on {data.get('root')}); {advice}")
    elif data.get("root") != str(config.data_root):
        raise CheckpointError(f"{config.pretrained} was pretrained on {data.get('root')}, not on "
                              f"{config.data_root}; {advice}")


def starting_weights(method: MethodSpec, config: DownstreamConfig
                     ) -> tuple[DownstreamConfig, dict[str, torch.Tensor] | None, Path | None, dict | None]:
    """The config with the architecture settled (and, for volumes, the grid the encoder was pretrained on where
    `--volume-size`/`--voxel-size` leave it open), the encoder weights a run starts from, the file they came
    from (the pretrained checkpoint, local torchvision weights with `--resnet --init-weights`, or none: random)
    and the pretraining's record of its data."""
    if config.init_weights is not None and not config.resnet:
        raise InputError("--init-weights goes with --resnet; without it the encoder comes from --pretrained")
    if not config.resnet:
        arch, encoder, data, grid = pretrained_encoder(method, config)
        if config.dims == 3:
            config = replace(config, **{name: value for name, value in grid.items() if getattr(config, name) is None})
        return replace(config, arch=arch), encoder, config.pretrained, data
    config = replace(config, arch=config.arch or DEFAULT_ARCH[config.dims])
    if config.init_weights is None:
        return config, None, None, None
    return config, local_weights(config.init_weights, config.arch), config.init_weights, None


def labelled_splits(description: DatasetDescription,
                    config: DownstreamConfig) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
    """The train images of the run's label fraction, and the val and test images, from the split files."""
    description.check_root(config.data_root)
    records = description.find_labelled(config.data_root)
    splits = load_splits(description, records, config.split_dir)
    by_id = {r.image_id: r for r in records}
    train, val, test = ([by_id[image_id] for image_id in splits[name]]
                        for name in (f"train{config.fraction}F", "val", "test"))
    if len(train) < 2:
        raise InputError(f"the {config.fraction} % split has {len(train)} image; pick a larger --fraction")
    return train, val, test


def downstream_epochs(config: DownstreamConfig) -> int:
    """The run's epochs: `--epochs`, else the mode's default."""
    return config.epochs or (FROZEN_EPOCHS if config.frozen else FINETUNE_EPOCHS)


def epochs_and_passes(config: DownstreamConfig, train_images: int, batch_size: int) -> tuple[int, int]:
    """The run's epochs and passes over the split per epoch: without `--epochs`, enough passes that the run
    takes at least MIN_STEPS optimizer steps."""
    epochs = downstream_epochs(config)
    if config.epochs:
        return epochs, 1
    return epochs, math.ceil(math.ceil(MIN_STEPS / epochs) * batch_size / train_images)


def downstream_identity(description: DatasetDescription, run: DownstreamConfig) -> dict[str, object]:
    """The run identity of a downstream config (its architecture settled): its fields with the mode's
    epochs, the dataset, the number of processes, and the hashes of the files the encoder starts from
    (the pretraining checkpoint, `--init-weights`) instead of their paths: another checkpoint at the same
    path is another run."""
    return {**replace(run, epochs=downstream_epochs(run)).identity(),
            "method": "supervised" if run.resnet else run.method, "mode": run.mode, "dataset": description.name,
            "world_size": distributed.world_size(),
            # a file that is not there has no identity (None): the run itself refuses it first, a study as other
            "pretrained": file_digest(run.pretrained) if not run.resnet and run.pretrained and run.pretrained.is_file()
            else None,
            "init_weights": file_digest(run.init_weights) if run.init_weights is not None else None}


def classifier_optimizer(model: nn.Module, config: DownstreamConfig, probe_lrs: tuple[float, ...],
                         pretrained: bool) -> torch.optim.Optimizer:
    """The linear probe: SGD, one parameter group per head of the grid at its own rate. Fine-tuning: AdamW,
    the head at `--lr` (default FINETUNE_LR), the encoder at `--encoder-lr-scale` times that."""
    family = architecture(config.arch)
    if config.frozen:
        grid = family.output_layer(model)
        return torch.optim.SGD([{"params": list(h.parameters()), "lr": lr} for h, lr in zip(grid.heads, probe_lrs)],
                               lr=probe_lrs[0], momentum=0.9, weight_decay=0.0)
    head, head_lr = family.classifier_prefix, config.lr or FINETUNE_LR
    # a randomly initialised encoder has no features to protect: it always trains at the head's rate
    encoder_scale = config.encoder_lr_scale if config.encoder_lr_scale is not None else \
        (FINETUNE_ENCODER_LR_SCALE if pretrained else 1.0)
    groups = [{"params": [p for n, p in model.named_parameters() if n.startswith(head)], "lr": head_lr},
              {"params": [p for n, p in model.named_parameters() if not n.startswith(head)],
               "lr": head_lr * encoder_scale}]
    return torch.optim.AdamW(groups, lr=head_lr, weight_decay=1e-4)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Binary cross-entropy per label (multi-label) or softmax cross-entropy. Logits of a probe grid
    (B x heads x classes) give the sum of each head's own mean loss, so each head gets its own gradient."""
    if logits.dim() == 3:
        heads = logits.shape[1]
        return heads * classification_loss(logits.flatten(0, 1), labels.repeat_interleave(heads, dim=0), multilabel)
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, labels)
    return F.cross_entropy(logits, labels.argmax(dim=1))


def split_metrics(description: DatasetDescription, split: list[ImageRecord], truth: np.ndarray,
                  probability: np.ndarray, kept: np.ndarray, interval: bool = False) -> dict:
    """Metrics of one split's predictions (of its readable images, `kept`); with `interval`, a
    patient-bootstrap 95 % interval of the headline ones. Images that could not be read are counted
    (`unreadable_images`) and listed in skipped.csv, never silently left out."""
    classes, multilabel = description.classes, description.multilabel
    patients = [description.patient_group(split[i]) or split[i].image_id for i in kept] \
        if description.patient_vote or interval else None
    metrics = evaluate(truth, probability, classes, multilabel, patients if description.patient_vote else None)
    if interval:
        metrics["ci95"] = {
            name: bootstrap_interval(truth, probability, patients,
                                     lambda y, p, name=name: evaluate(y, p, classes, multilabel)[name])
            for name in reported_metrics(multilabel)}
    metrics["unreadable_images"] = len(split) - len(kept)
    return metrics


def four_digits(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def selection_score(metrics: dict, selection: str) -> float:
    """What picks the epoch (and the probe's head): the selection metric, else minus the weighted log loss
    (RSNA when a split holds a single class)."""
    return metrics[selection] if metrics[selection] is not None else -metrics.get("weighted_log_loss", 0.0)


def downstream(description: DatasetDescription, config: DownstreamConfig) -> None:
    """Train and evaluate a classifier on `--fraction` % of the labels; writes metrics.json and checkpoint.pth."""
    method = METHODS[config.method]
    description = description.in_dims(config.dims)
    session = RunSession(config, publish=False)
    device, precision = session.device, session.precision
    run, encoder, source, pretraining_data = starting_weights(method, config)
    run = settled_inputs(run, description)
    inputs = input_space(run, description)
    check_input_size(run.arch, inputs.size)  # one MIRL can build at this size, or an input error now
    mode = run.mode
    session.settle_identity(downstream_identity(description, run))
    train, val, test = labelled_splits(description, run)
    session.add_to_identity({"splits": split_files_digest(run.split_dir)})  # the splits' contents, once they exist
    identity = session.identity
    check_pretraining_data(run, pretraining_data, test)
    cache = session.cache_then_seed(description, run, inputs)
    classes = description.classes
    family = architecture(run.arch)
    model = build_classifier(run.arch, len(classes))
    if encoder is not None:
        load_encoder(model, encoder, source, run.arch)
    head = family.classifier_prefix
    output_prefix = family.output_prefix(model)
    probe_lrs = (run.lr,) if run.lr else PROBE_LRS
    if run.frozen:
        # what the encoder must still be after linear training: the loaded weights, or a random encoder's own
        start = encoder if encoder is not None else \
            {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(head)}
        for p in model.parameters():
            p.requires_grad = False
        family.replace_output_layer(model, ProbeGrid(family.output_layer(model).in_features,
                                                           len(classes), len(probe_lrs)))
    model = prepare_network(model, device, run.channels_last, run.compile, inputs.spatial_dims)
    # `network` trains (wrapped for DDP under torchrun); `model` is the plain torchvision model it wraps
    network = session.parallel(model)
    optimizer = classifier_optimizer(model, run, probe_lrs, pretrained=encoder is not None)

    def dataset(split: list[ImageRecord]) -> torch.utils.data.Dataset:
        return inputs.dataset(split, len(classes), cache)

    batch_size = min(run.batch_size, len(train))
    epochs, passes = epochs_and_passes(run, len(train), batch_size)
    run = replace(run, epochs=epochs)
    train_loader = make_loader(dataset(train), batch_size, run.workers, shuffle=True, drop_last=False,
                               seed=run.seed, passes=passes)
    val_loader, test_loader = (make_loader(dataset(s), run.batch_size, run.workers, shuffle=False, drop_last=False,
                                           seed=run.seed) for s in (val, test))
    total_steps = run.epochs * len(train_loader)
    warmup_steps = 0 if run.frozen else round(FINETUNE_WARMUP * total_steps)
    schedule = "step" if run.frozen else "cosine"
    scheduler = build_scheduler(optimizer, schedule, total_steps, warmup_steps)
    augment = inputs.downstream_view(run.frozen)
    evaluate_every = max(1, run.epochs // EVALUATIONS)
    record = session.write_config(config, run, description, {
        "method": identity["method"], "mode": mode, "steps": total_steps, "passes_per_epoch": passes,
        "warmup_steps": warmup_steps, "optimizer": type(optimizer).__name__,
        # the linear probe: one rate per head of the grid; fine-tuning: the head's, then the encoder's
        "learning_rates": [group["initial_lr"] for group in optimizer.param_groups],
        "train_images": len(train), "val_images": len(val), "test_images": len(test), "schedule": schedule,
        **inputs.describe()})
    session.list_left_out([*train, *val, *test])
    log = session.log

    def step_loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return classification_loss(network(augment(images)).float(), labels, description.multilabel)

    selection = primary_metric(description.multilabel)

    def predictions(loader: torch.utils.data.DataLoader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        truth, probability, kept = predict(model, loader, device, precision, description.multilabel,
                                           inputs.evaluation_view)
        if len(kept) < len(loader.dataset):
            trainer.note_unreadable(loader.dataset, sorted(set(range(len(loader.dataset))) - set(kept.tolist())))
        return truth, probability, kept

    best = {"score": -np.inf, "state": None, "epoch": 0, "step": 0, "lr": None}

    def end_of_epoch(epoch: int) -> dict[str, float]:
        if (epoch + 1) % evaluate_every and epoch + 1 != run.epochs:
            return {}
        truth, probability, kept = predictions(val_loader)
        # the linear probe's grid: one set of metrics per head, the best head speaks for the epoch
        per_head = [split_metrics(description, val, truth, probability[:, h], kept)
                    for h in range(probability.shape[1])] if run.frozen \
            else [split_metrics(description, val, truth, probability, kept)]
        scores = [selection_score(m, selection) for m in per_head]
        chosen = int(np.argmax(scores))
        metrics = per_head[chosen]
        for name in ("auc_macro", "accuracy", "balanced_accuracy", "patient_accuracy", "weighted_log_loss"):
            if metrics.get(name) is not None:
                log.scalar(f"val/{name}", metrics[name])
        if scores[chosen] > best["score"]:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best.update(score=scores[chosen], epoch=epoch + 1, step=log.step,
                        state=with_chosen_head(state, output_prefix, chosen) if run.frozen else state,
                        lr=probe_lrs[chosen] if run.frozen else optimizer.defaults["lr"])
        return {f"val_{selection}": metrics[selection]}

    def train_mode() -> None:
        # the linear protocol keeps the frozen encoder's BatchNorm statistics fixed
        model.train(not run.frozen)

    def snapshot() -> dict:
        return {"method": record["method"], "mode": mode, "arch": run.arch, "dataset": description.name,
                "run": identity, "model": model.state_dict(), "best": dict(best)}

    def restore(state: dict) -> None:
        model.load_state_dict(state["model"])
        best.update(state["best"])
    session.restore_weights(restore)
    trainer = Trainer(step_loss, train_loader, optimizer, scheduler, device, precision, session.store,
                      run.save_every, snapshot, loss_terms=len(probe_lrs) if run.frozen else 1,
                      save_minutes=run.save_minutes)
    session.train(trainer, run.epochs, end_of_epoch, train_mode)
    if run.frozen:  # back to the plain torchvision classifier, holding the head chosen on validation
        family.replace_output_layer(model, nn.Linear(family.output_layer(model).heads[0].in_features,
                                                     len(classes)).to(device))
    model.load_state_dict(best["state"])
    if run.frozen:
        changed = [k for k, v in model.state_dict().items() if not k.startswith(head) and
                   not torch.equal(v.cpu(), start[k])]
        if changed:
            raise RuntimeError(f"the frozen encoder changed during linear training ({changed[:3]})")

    test_truth, test_probability, test_kept = predictions(test_loader)
    results = {"test": split_metrics(description, test, test_truth, test_probability, test_kept, interval=True),
               "val": split_metrics(description, val, *predictions(val_loader))}
    if distributed.is_main_process():  # what a paired comparison of two runs on the same test images needs
        with writing(run.output_dir / PREDICTIONS_FILE) as tmp, open(tmp, "wb") as f:
            np.savez(f, image_ids=np.array([test[i].image_id for i in test_kept]), truth=test_truth,
                     probability=test_probability)
    results.update(best_epoch=best["epoch"], selected_by=f"val {selection}", lr=best["lr"], mode=mode,
                   fraction=run.fraction, arch=run.arch, method=record["method"], epochs=run.epochs,
                   train_images=len(train),
                   identity=identity, run_id=record["run_id"])
    log.json("metrics.json", results)
    for name in ("auc_macro", "accuracy", "balanced_accuracy", "patient_accuracy"):
        if results["test"].get(name) is not None:
            log.scalar(f"test/{name}", results["test"][name], best.get("step", log.step))
    save_checkpoint({"method": record["method"], "mode": mode, "arch": run.arch, "dataset": description.name,
                     "image_size": run.image_size, **inputs.describe(), "run": identity,
                     "image_kinds": image_kinds([*train, *val, *test]),
                     "classes": list(classes), "model": model.state_dict(), "best_epoch": best["epoch"]},
                    run.output_dir / CHECKPOINT_NAME)
    # published: metrics.json and checkpoint.pth are what a finished run needs
    session.publish(run.keep_states, {**run.flags(), "mode": mode, "selected_lr": best["lr"]},
                    {f"test_{k}": results["test"].get(k) for k in reported_metrics(description.multilabel)})
    if distributed.is_main_process():
        print(f"test {selection}: {four_digits(results['test'][selection])}  (val {selection} "
              f"{four_digits(results['val'][selection])}, best epoch {best['epoch']}) -> "
              f"{run.output_dir / 'metrics.json'}")
