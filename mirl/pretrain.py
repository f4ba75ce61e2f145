"""Self-supervised pretraining with any registered method (`mirl.models.METHODS`) and its paper's defaults.

Labels are never read for training. When the data has a label CSV, the test split is held out so
the downstream evaluation stays honest; a plain folder of images is used whole.
"""
from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import torch

from mirl import distributed
from mirl.checkpoints import CHECKPOINT_NAME, file_digest
from mirl.config import PretrainConfig
from mirl.datasets import DatasetDescription, DecodedImages, ImageRecord, image_kinds
from mirl.encoders import architecture, check_input_size, local_weights, start_encoders_from
from mirl.errors import InputError
from mirl.flags import DEFAULT_ARCH
from mirl.loaders import make_loader
from mirl.method_spec import MethodSpec, TrainingPlan, TrainingRecipe
from mirl.methods import METHODS
from mirl.monitor import KnnMonitor, sample_records
from mirl.optim import LARS, build_scheduler, lars_parameter_groups
from mirl.positives import PairedImages, partner_candidates
from mirl.pretraining_method import PretrainingMethod
from mirl.run_session import RunSession
from mirl.runtime import prepare_network
from mirl.spatial import InputSpace, input_space, settled_inputs
from mirl.splits import load_splits, split_digest, split_files_digest
from mirl.training import Trainer


def pretraining_records(description: DatasetDescription, config: PretrainConfig
                        ) -> tuple[list[ImageRecord], dict[str, list[ImageRecord]] | None, str | None]:
    """Every image the encoder may see: all of them, minus the test split's images and patients when
    the data has labels; then also the labelled train and val images the kNN monitor uses, and the
    fingerprint of the test split held out (`split_digest`; None without labels)."""
    description.check_root(config.data_root)
    labelled = description.find_labelled(config.data_root) if description.has_labels(config.data_root) else None
    records = description.pretraining_images(config.data_root, labelled)
    if not records:
        raise InputError(f"no images found under {config.data_root}; {description.data_hint}")
    monitor_sets, held_out = None, None
    if labelled is None and config.supervised:
        raise InputError(f"--supervised needs labelled data, but {config.data_root} has no labels; "
                         f"{description.data_hint}")
    if labelled is not None:
        splits = load_splits(description, labelled, config.split_dir)
        by_id = {r.image_id: r for r in labelled}
        monitor_sets = {name: [by_id[i] for i in splits[name]] for name in ("train100F", "val")}
        test = [by_id[i] for i in splits["test"]]
        records = outside_test_patients(description, records, test)
        held_out = split_digest(splits["test"])
        if config.supervised:
            records = label_aware_records(records, usable_labels(labelled, records, splits, config.fraction),
                                          len(description.classes))
    share = len(records) // distributed.world_size()  # each process's part of an epoch
    if share < config.batch_size:
        raise InputError(f"--batch-size {config.batch_size} is more than the {share} pretraining images of each of "
                         f"{distributed.world_size()} process(es): an epoch would have no full batch; lower it")
    return records, monitor_sets, held_out


def outside_test_patients(description: DatasetDescription, records: list[ImageRecord],
                          test: list[ImageRecord]) -> list[ImageRecord]:
    """`records` without the `test` images and without any other image of a test image's patient, by the
    dataset's own patient grouping (an RSNA slice's PatientID, not `record.group`, which its reader leaves
    empty): a user's split files need not be grouped by patient, and a test patient's other slices (or,
    for ACDC, the frames of their cine, which are in no split) must not become pretraining images or
    positive partners."""
    groups = {r.image_id: description.patient_group(r) for r in records}  # an RSNA header read once per slice
    test_ids = {r.image_id for r in test}
    test_patients = {groups[r.image_id] if r.image_id in groups else description.patient_group(r) for r in test}
    return [r for r in records if r.image_id not in test_ids and groups[r.image_id] not in test_patients - {None}]


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


def training_recipe(method: MethodSpec, arch: str) -> TrainingRecipe:
    """The method's paper recipe for this architecture (a transformer's where the method has one)."""
    return method.recipe_for(architecture(arch).transformer)


def learning_rate(recipe: TrainingRecipe, config: PretrainConfig) -> float:
    """`--lr`, else the recipe's rate per 256 images scaled linearly to the global batch."""
    if config.lr is not None:
        return config.lr
    return recipe.lr_per_256 * config.batch_size * distributed.world_size() / 256


def build_optimizer(model: PretrainingMethod, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Pretraining's optimizer over the method's parameter groups: SGD with momentum 0.9, LARS (whose groups
    exempt biases and norms from adaptation and decay) or AdamW."""
    if name == "lars":
        return LARS(lars_parameter_groups(model), lr=lr, weight_decay=weight_decay)
    groups = model.parameter_groups()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    # fused: one kernel for every parameter's update instead of a few calls per parameter
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay, fused=True)


def settled_config(method: MethodSpec, config: PretrainConfig, resumed: dict | None,
                   description: DatasetDescription) -> PretrainConfig:
    """The run as it will train: the architecture (a resumed state's when none is asked for), epochs,
    optimizer, learning rate and augmentation family (the method's recipe for the architecture and the
    dataset's where none is given) and the method's options completed. An architecture the method has no
    recipe for, or that cannot take the image size, is refused here, before the data is listed."""
    if config.supervised and not method.label_aware:
        raise InputError(f"{method.title} has no label-aware form; --supervised exists for "
                         f"{', '.join(spec.title for spec in METHODS.values() if spec.label_aware)}")
    arch = config.arch or (resumed.get("arch") if resumed is not None else None) or DEFAULT_ARCH[config.dims]
    recipe = training_recipe(method, arch)
    options = method.options(config.options)
    config = settled_inputs(config, description)
    inputs = input_space(config, description)
    for view in method.views(options, config.image_size, architecture(arch).transformer):
        check_input_size(arch, inputs.view_size(view))
    return replace(config, arch=arch, epochs=config.epochs or recipe.epochs,
                   optimizer=config.optimizer or recipe.optimizer, lr=learning_rate(recipe, config),
                   augment=config.augment or description.augment, options=asdict(options))


def pretraining_identity(description: DatasetDescription, run: PretrainConfig) -> dict[str, object]:
    """The run identity of a settled pretraining config: its fields, the dataset, the number of processes
    (the global batch) and the hash of the weights it starts from (`--init-weights`) instead of their path."""
    return {**run.identity(), "dataset": description.name, "world_size": distributed.world_size(),
            "init_weights": file_digest(run.init_weights) if run.init_weights is not None else None}


def pair_loader(description: DatasetDescription, run: PretrainConfig, inputs: InputSpace, records: list[ImageRecord],
                label_dim: int, cache: DecodedImages | None
                ) -> tuple[torch.utils.data.DataLoader, list[list[int]] | None]:
    """The loader of pretraining batches and, with `--positives study|patient`, each image's candidate
    partners (a pair's two views then come from two images of one study or patient)."""
    dataset = inputs.dataset(records, label_dim, cache)
    partners = None
    if run.positives != "views":
        partners = partner_candidates(description, records, run.positives)
        dataset = PairedImages(dataset)
    loader = make_loader(dataset, run.batch_size, run.workers, shuffle=True, drop_last=True, seed=run.seed,
                         partners=partners)
    return loader, partners


def pretrain(description: DatasetDescription, config: PretrainConfig) -> None:
    """Pretrain an encoder. `checkpoint.pth` is always the newest training state; its `encoder` loads
    into the plain torchvision model. `--resume` continues a run exactly where a state left it."""
    method = METHODS[config.method]
    description = description.in_dims(config.dims)
    session = RunSession(config, publish=True)
    device, precision, resumed = session.device, session.precision, session.resumed
    run = settled_config(method, config, resumed, description)
    session.settle_identity(pretraining_identity(description, run), unsettled=method.settled_options)
    # read before listing the data, so a bad file stops the run at once; a resumed run has its own weights
    initial = local_weights(run.init_weights, run.arch) if run.init_weights is not None and resumed is None else None
    records, monitor_sets, held_out = pretraining_records(description, run)
    inputs = input_space(run, description)
    kinds = image_kinds(records)  # the readers its images went through, for an export's preprocessing record
    # what follows from the number of images (MoCo's K), and the contents of the splits the data was held out by
    options = method.prepare(method.options(run.options), len(records))
    prepared = {name: getattr(options, name) for name in method.settled_options}
    run = replace(run, options=asdict(options))
    session.add_to_identity({**prepared, "splits": split_files_digest(run.split_dir) if held_out is not None else None})
    identity = session.identity
    cache = session.cache_then_seed(description, run, inputs)
    # a label-aware run: the label vectors gain a "no finding" class, and the method receives them
    label_dim = len(description.classes) + 1 if run.supervised else 0
    loader, partners = pair_loader(description, run, inputs, records, label_dim or len(description.classes), cache)
    total_steps = run.epochs * len(loader)
    recipe = training_recipe(method, run.arch)
    transformer = architecture(run.arch).transformer
    views = method.views(options, run.image_size, transformer)
    model = prepare_network(method.build(run.arch, options, TrainingPlan(total_steps, len(loader), label_dim)),
                            device, run.channels_last, run.compile, inputs.spatial_dims)
    if initial is not None:
        start_encoders_from(model, initial, run.init_weights, run.arch)
    core = model
    session.restore_weights(lambda state: core.load_state_dict(state["model"]))
    # every rank enqueues the same gathered keys, so the queue (32 MB at K = 65,536) is not broadcast each step;
    # each rank's BatchNorm keeps its own running statistics, as under fb/moco, and rank 0's are saved
    model = session.parallel(model, broadcast_buffers=False)
    optimizer = build_optimizer(core, run.optimizer, run.lr, recipe.weight_decay)
    warmup = min(recipe.warmup_epochs * len(loader), total_steps // 10)
    scheduler = build_scheduler(optimizer, recipe.schedule, total_steps, warmup, recipe.weight_decay_end)
    augments = [inputs.training_view(view, run.augment) for view in views]

    record = session.write_config(config, run, description, {
        "method": method.name, "images": len(records),
        "images_with_a_partner": sum(map(bool, partners)) if partners is not None else None,
        # the schedule as it runs: the rate above is the one used (--lr, else lr_per_256 x global batch / 256)
        "lr_per_256": recipe.lr_per_256, "weight_decay": recipe.weight_decay,
        "weight_decay_end": recipe.weight_decay_end, "schedule": recipe.schedule, "recipe": recipe.source,
        "views": [asdict(view) for view in views], "steps": total_steps, "warmup_steps": warmup,
        "labelled_images": sum(bool(r.labels.any()) for r in records) if run.supervised else 0,
        **inputs.describe()})
    session.list_left_out(records)
    log = session.log

    def step_loss(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # the method's views of each image, or alternately of each pair's two images
        batch = tuple(augment(images if partners is None else images[:, i % 2]) for i, augment in enumerate(augments))
        loss, _ = model(*batch, labels) if run.supervised else model(*batch)
        return loss, core.logged_scalars()

    monitor = None
    if monitor_sets and run.knn_images > 0 and distributed.is_main_process():
        monitor = KnnMonitor(description, sample_records(monitor_sets["train100F"], run.knn_images, run.seed),
                             sample_records(monitor_sets["val"], run.knn_images // 2, run.seed), inputs,
                             device, precision, run.batch_size, run.workers, cache)
    latest = {"monitor": resumed.get("monitor", {}) if resumed is not None else {}}

    def snapshot() -> dict:
        return {"method": method.name, "arch": run.arch, "dataset": description.name, "run": identity,
                "image_size": run.image_size, **inputs.describe(),
                "supervised_fraction": run.fraction if run.supervised else None,
                # what the encoder was pretrained on, so downstream runs on other data or splits are refused
                "data": {"root": str(run.data_root), "labels": str(run.labels) if run.labels else None,
                         "image_kinds": kinds,
                         "test_split": held_out, "init_weights": str(run.init_weights) if run.init_weights else None},
                "encoder": core.feature_encoder().state_dict(), "model": core.state_dict(),
                "monitor": latest["monitor"], "config": {k: str(v) for k, v in record.items()}}

    def end_of_epoch(epoch: int) -> dict[str, float]:
        latest["monitor"] = monitor(core.feature_encoder()) if monitor else {}
        for name, value in latest["monitor"].items():
            log.scalar(f"monitor/{name}", value)
        return latest["monitor"]

    trainer = Trainer(step_loss, loader, optimizer, scheduler, device, precision, session.store, run.save_every,
                      snapshot, save_minutes=run.save_minutes, hooks=core)
    session.train(trainer, run.epochs, end_of_epoch, train_mode=model.train)
    final = {"loss": trainer.last_loss, **latest["monitor"]}
    # published: checkpoint.pth, a hard link of the newest state, is what remains
    session.publish(run.keep_states, run.flags(), final)
    if distributed.is_main_process():
        numbers = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if v is not None)
        print(f"pretraining done: {run.epochs} epochs, {total_steps} steps ({numbers}); encoder in "
              f"{run.output_dir / CHECKPOINT_NAME}")
