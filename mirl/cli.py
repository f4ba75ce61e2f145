"""The scripts' edge: command-line flags, their checks, and turning input errors into one line.

Each dataset folder's scripts call `pretrain_script` or `downstream_script` with the dataset and
method they bind; defaults for data, splits and outputs live next to the script. Everything the flags
need is torch-free (`mirl.config`, `mirl.flags`, the method registry), and the training code is imported
once the flags have parsed: `--help` and a mistyped flag answer at once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from mirl.codecs import codec_flag
from mirl.config import (
    AUGMENT_STYLES,
    CHECKPOINT_NAME,
    FRACTIONS,
    POSITIVES,
    SPATIAL_DIMS,
    AnyConfig,
    DownstreamConfig,
    PretrainConfig,
    RunConfig,
)
from mirl.errors import InputError
from mirl.flags import (
    TORCHVISION_ENCODERS,
    VOLUME_ENCODERS,
    OneLineParser,
    architecture_name,
    batch_size,
    image_size,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    random_seed,
    volume_side,
)
from mirl.methods import METHODS

if TYPE_CHECKING:
    from mirl.datasets import DatasetDescription


def _common_arguments(parser: argparse.ArgumentParser, folder: Path, epochs_help: str) -> None:
    parser.add_argument("--data-root", type=Path, default=folder / "data",
                        help="dataset folder (default: data/ beside the script)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where checkpoint, config.json, metrics and TensorBoard logs go (default: runs/RUN "
                             "beside the script for its data/ folder, runs/DATA-HASH/RUN for other data)")
    parser.add_argument("--split-dir", type=Path, default=None,
                        help="label-fraction split files, made on first use (default: splits/ beside the script "
                             "for its data/ folder, splits/DATA-HASH/ for other data)")
    parser.add_argument("--epochs", type=positive_int, default=None, help=epochs_help)
    parser.add_argument("--batch-size", type=batch_size, default=RunConfig.batch_size)
    parser.add_argument("--arch", type=architecture_name, default=None, metavar="ARCH",
                        help=f"encoder: {', '.join(TORCHVISION_ENCODERS)}, or any timm network as timm:NAME "
                             "(a vision transformer such as timm:vit_small_patch16_224 with DINO); with --dims 3: "
                             f"{', '.join(VOLUME_ENCODERS)} (default resnet50, resnet50_3d; downstream: the "
                             "checkpoint's)")
    parser.add_argument("--image-size", type=image_size, default=RunConfig.image_size,
                        help="side of the 2-D input in pixels")
    parser.add_argument("--dims", type=int, choices=SPATIAL_DIMS, default=RunConfig.dims,
                        help="2: images (a volume's slices one by one); 3: volumes (RSNA series, ACDC ED/ES and cine "
                             "frames, NIfTI or DICOM-series folders) with a 3-D encoder (--arch resnet18_3d, ...)")
    parser.add_argument("--volume-size", type=volume_side, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="--dims 3: the input in voxels (default: the dataset's, README Volumes)")
    parser.add_argument("--voxel-size", type=positive_float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="--dims 3: the input's voxel size in mm (default: the dataset's; a folder of your own "
                             "volumes: each volume's whole extent fitted to --volume-size)")
    parser.add_argument("--workers", type=non_negative_int, default=RunConfig.workers)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="autocast dtype; auto is bf16 where the device runs it fast")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="the learning rate itself, used as given (default: pretraining scales the method's "
                             "rate per 256 images to the global batch; a linear probe chooses it on validation from "
                             "a grid; fine-tuning uses 0.001); config.json records the rate used")
    parser.add_argument("--config", type=Path, default=None, metavar="OUTPUT/config.json",
                        help="relaunch the run that wrote this config.json: its flags are the defaults, and any flag "
                             "given here overrides one of them (e.g. --output-dir)")
    parser.add_argument("--seed", type=random_seed, default=RunConfig.seed)
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels only: the same seed gives the same weights, and a resumed run "
                             "ends where an unbroken one does (slower on GPUs)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the newest training state in --output-dir (auto; starts afresh when "
                             "there is none) or from a given state file")
    parser.add_argument("--save-every", type=non_negative_int, default=RunConfig.save_every, metavar="STEPS",
                        help="also save a training state every STEPS optimizer steps inside an epoch (0: epoch ends "
                             "only)")
    parser.add_argument("--save-minutes", type=non_negative_float, default=RunConfig.save_minutes, metavar="MIN",
                        help="an epoch's end saves a training state only when this many minutes have passed since "
                             "the last save (the last epoch, a stop signal and --save-every always save; 0: every "
                             "epoch end)")
    parser.add_argument("--keep", type=positive_int, default=RunConfig.keep,
                        help="how many of the newest training states to keep in OUTPUT_DIR/checkpoints")
    parser.add_argument("--keep-states", action="store_true",
                        help="keep OUTPUT_DIR/checkpoints once the run has published its result (default: removed; "
                             "a finished run needs only checkpoint.pth and metrics.json)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder of decoded-image caches (mirl.cache): built on first use, then read "
                             "instead of decoding every image every epoch")
    parser.add_argument("--codec", type=codec_flag, default=RunConfig.codec,
                        help="how --cache stores them: raw (a memory-mapped array, default), or compressed in shards "
                             "that each torchrun rank reads its own of: zstd[:LEVEL], png[:LEVEL], "
                             "webp[:QUALITY|lossless], jpeg[:QUALITY] (decoded on the GPU there)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels_last memory format (faster convolutions on GPUs and oneDNN CPUs)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (slow first steps)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="your own labels: a CSV with an image column and one 0/1 column per class, images "
                             "(PNG/JPEG/DICOM) found by name under --data-root")
    parser.add_argument("--group-column", default=None, metavar="NAME",
                        help="with --labels: the CSV column naming each image's patient, so one patient's images "
                             "stay on one side of every split (default: each image its own patient)")


def pretrain_parser(dataset: str, method: str, folder: Path) -> argparse.ArgumentParser:
    spec = METHODS[method]
    parser = OneLineParser(prog=f"{spec.title} pretraining on {dataset}",
                           description=f"Self-supervised {spec.title} pretraining of an encoder; labels unused.")
    _common_arguments(parser, folder, f"default {spec.recipe.epochs}, the paper recipe's")
    parser.add_argument("--optimizer", choices=("sgd", "lars", "adamw"), default=None,
                        help="default: the method's paper recipe for the architecture (README, Methods)")
    parser.add_argument("--augment", choices=AUGMENT_STYLES, default=None,
                        help="how the method's paper recipes fit the images: paper (as published), grey (any "
                             "grey-scale image), ct (window level/width jitter), mr (intensity scale, offset, "
                             "gamma), dermoscopy (every flip and quarter turn, mild colour jitter); default: the "
                             "dataset's, chosen on validation where real data was at hand (README)")
    parser.add_argument("--positives", choices=POSITIVES, default=PretrainConfig.positives,
                        help="what a pair's two views come from: two augmentations of one image (views), two "
                             "neighbouring images of one study (study: adjacent slices of a series or volume, "
                             "another photo of a lesion), or any two images of one patient (patient); an image "
                             "without another pairs with itself")
    parser.add_argument("--init-weights", type=Path, default=None,
                        help="a local state dict of --arch (e.g. ImageNet weights saved beforehand; never "
                             "downloaded) that the encoder(s) start from instead of random weights")
    parser.add_argument("--knn-images", type=non_negative_int, default=PretrainConfig.knn_images,
                        help="labelled train images in the kNN monitor's bank (half as many val queries); 0: off")
    if spec.label_aware:
        parser.add_argument("--supervised", action="store_true",
                            help=f"label-aware {spec.title}: images of the --fraction split that share a label are "
                                 "positives too (supervised contrastive loss over the queue); the other images stay "
                                 "unlabelled")
        parser.add_argument("--fraction", type=int, choices=FRACTIONS, default=100,
                            help="with --supervised: percent of training labels used (its split file)")
    spec.add_flags(parser)
    return parser


def downstream_parser(dataset: str, method: str, folder: Path) -> argparse.ArgumentParser:
    spec = METHODS[method]
    parser = OneLineParser(prog=f"{spec.title} downstream on {dataset}",
                           description="Train a classifier on a label fraction: from the pretrained encoder "
                                       "(fine-tune, or --frozen linear probe) or a supervised ResNet (--resnet).")
    _common_arguments(parser, folder, "default: 100 for --frozen, else 30, with enough passes over a small split "
                                      "per epoch that a run takes at least 200 optimizer steps")
    parser.add_argument("--pretrained", type=Path, default=None,
                        help=f"checkpoint written by {spec.script} (default: the one it wrote by default for "
                             "the same data)")
    parser.add_argument("--transfer", action="store_true",
                        help="the --pretrained encoder was pretrained on other data on purpose (otherwise a "
                             "checkpoint of other data, or of other splits, is refused)")
    parser.add_argument("--fraction", type=int, choices=FRACTIONS, default=100, help="percent of training labels")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--frozen", action="store_true", help="train only a linear head on the frozen encoder")
    mode.add_argument("--resnet", action="store_true", help="supervised baseline without self-supervised pretraining")
    parser.add_argument("--encoder-lr-scale", type=positive_float, default=None,
                        help="fine-tuning: the encoder's learning rate as a multiple of the head's (default 1, "
                             "chosen on validation; see the README)")
    parser.add_argument("--init-weights", type=Path, default=None,
                        help="with --resnet: a local torchvision state dict to start from (never downloaded)")
    return parser


def bound_dataset(dataset: str, config: RunConfig) -> DatasetDescription:
    """The script's dataset, or the user's own labelled data when `--labels` is given, read with the run's dims."""
    from mirl.datasets import DATASETS, with_label_csv  # after parsing: see the module's docstring
    if config.labels is None:
        if config.group_column is not None:
            raise InputError("--group-column names a column of your --labels CSV; pass --labels too")
        return DATASETS[dataset].in_dims(config.dims)
    return with_label_csv(DATASETS[dataset], config.labels, config.data_root, config.group_column).in_dims(config.dims)


def script_name(dataset: str, script_file: str) -> str:
    """How a run records the script that made it: the dataset it binds and the file's name."""
    return f"{dataset}/{Path(script_file).name}"


def recorded_arguments(parser: argparse.ArgumentParser, flags: dict[str, object],
                       config_type: type[RunConfig]) -> list[str]:
    """A config.json's recorded flags as command-line arguments, so that each value goes through the same type
    and check as one typed by hand. A key that is no flag of this script is an input error, unless it is a
    field of the run config at its default (label-aware MoCo's `supervised` and `fraction` are recorded by
    every method's run)."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    defaults = {f.name: f.default for f in fields(config_type)}
    arguments: list[str] = []
    for name, value in flags.items():
        action = actions.get(name)
        if action is None and name in defaults and defaults[name] == value:
            continue
        if action is None:
            raise InputError(f"{name!r} is not a flag of this script (misspelt, or written by another MIRL)")
        option = next(o for o in action.option_strings if o.startswith("--"))
        if value is None:  # the flag was left at its default
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            if not isinstance(value, bool):
                raise InputError(f"{name} is {json.dumps(value)[:40]}, expected true or false")
            if isinstance(action, argparse.BooleanOptionalAction):
                arguments.append(option if value else f"--no-{option[2:]}")
            elif value:
                arguments.append(option)
        elif action.nargs in ("+", "*") or isinstance(action.nargs, int):
            if not isinstance(value, list) or not value:
                raise InputError(f"{name} is {json.dumps(value)[:40]}, expected a list of values")
            arguments += [option, *map(str, value)]
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            arguments.append(f"{option}={value}")
        else:
            raise InputError(f"{name} is {json.dumps(value)[:40]}, expected one value")
    return arguments


def parse_with_config(parser: argparse.ArgumentParser, script: str, config_type: type[RunConfig],
                      argv: list[str] | None) -> argparse.Namespace:
    """The flags of `argv`; with `--config OUTPUT/config.json`, the flags of the run that wrote it come first,
    so the same command relaunches that run and any flag given here overrides one of them. The config must be
    one this script wrote, and its values pass the same types and checks as typed flags."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.config is None:
        return args

    own_error = parser.error

    def refuse(message: str) -> NoReturn:
        own_error(f"--config {args.config}: {message}")
    try:
        record = json.loads(args.config.read_text())
    except (OSError, ValueError) as error:
        refuse(f"not a readable config.json ({type(error).__name__})")
    flags = record.get("flags") if isinstance(record, dict) else None
    if not isinstance(flags, dict):
        refuse("no flags recorded (written by an older MIRL, or not a run's config.json)")
    if record.get("script") != script:
        written_by = record.get("script") or "a run that names no script (mirl.study, a notebook or an older MIRL)"
        refuse(f"written by {written_by}, not by this script ({script}); relaunch it with that script")
    try:
        recorded = recorded_arguments(parser, flags, config_type)
    except InputError as error:
        refuse(str(error))
    parser.error = refuse  # a recorded value that fails its check names the config, not the command line
    try:
        parser.parse_args(recorded)
    finally:
        parser.error = own_error
    return parser.parse_args([*recorded, *argv])


def data_folder_name(folder: Path, data_root: Path, labels: Path | None) -> str | None:
    """The sub-folder of runs/ and splits/ that keeps runs on different data apart: none for the data/
    folder beside the scripts, else the data folder's name and a hash of its full path and label CSV (so
    another spelling of the same path names the same folder)."""
    root = data_root.resolve()
    if root == (folder / "data").resolve() and labels is None:
        return None
    digest = hashlib.sha256(f"{root}\0{labels.resolve() if labels else ''}".encode()).hexdigest()[:8]
    return f"{root.name or 'root'}-{digest}"


def default_folders(folder: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Where the script's runs go by default, and its split files, for the data it is given; a volume run's in
    their own `3d/` sub-folders (its records are volumes, its splits split volumes)."""
    name = data_folder_name(folder, args.data_root, args.labels)
    runs, splits = folder / "runs", folder / "splits"
    if name is not None:
        runs, splits = runs / name, splits / name
    return (runs, splits) if args.dims == 2 else (runs / "3d", splits / "3d")


def settled_flags(parser: argparse.ArgumentParser, kind: type[AnyConfig], flags: dict[str, object]) -> AnyConfig:
    """The config of a script's flags; flags that are each fine but not together (`--codec` without `--cache`)
    refused as the parser refuses a bad flag, in one line."""
    try:
        return kind.from_flags(flags)
    except InputError as error:
        parser.error(str(error))


def pretrain_script(dataset: str, method: str, script_file: str, argv: list[str] | None = None) -> int:
    """Entry point of every dataset folder's pretraining scripts."""
    folder = Path(script_file).resolve().parent
    script = script_name(dataset, script_file)
    parser = pretrain_parser(dataset, method, folder)
    args = parse_with_config(parser, script, PretrainConfig, argv)
    runs, splits = default_folders(folder, args)
    supervised = getattr(args, "supervised", False)
    default_run = f"{method}_super_{args.fraction}F" if supervised else method
    config = settled_flags(parser, PretrainConfig, {**vars(args), "method": method, "script": script,
                                                    "split_dir": args.split_dir or splits,
                                                    "output_dir": args.output_dir or runs / default_run})
    from mirl.edge import guarded  # after parsing: see the module's docstring
    from mirl.pretrain import pretrain
    return guarded(lambda: pretrain(bound_dataset(dataset, config), config))


def downstream_run_name(method: str, args: argparse.Namespace) -> str:
    """A downstream run's default folder name: `resnet_10F`, `mocov2_frozen_10F`; a run from another checkpoint
    than the method's default (label-aware MoCo's runs/moco_super_10F/, a seed's folder) is named after that
    checkpoint's folder, `moco_super_10F_finetune_10F`, so that it never shares a folder with the plain run."""
    if args.resnet:
        return f"resnet_{args.fraction}F"
    source = args.pretrained.resolve().parent.name if args.pretrained else method
    return f"{source}_{'frozen' if args.frozen else 'finetune'}_{args.fraction}F"


def downstream_script(dataset: str, method: str, script_file: str, argv: list[str] | None = None) -> int:
    """Entry point of every dataset folder's downstream scripts."""
    folder = Path(script_file).resolve().parent
    script = script_name(dataset, script_file)
    parser = downstream_parser(dataset, method, folder)
    args = parse_with_config(parser, script, DownstreamConfig, argv)
    runs, splits = default_folders(folder, args)
    config = settled_flags(parser, DownstreamConfig, {
        **vars(args), "method": method, "script": script, "split_dir": args.split_dir or splits,
        "output_dir": args.output_dir or runs / downstream_run_name(method, args),
        "pretrained": args.pretrained or runs / method / CHECKPOINT_NAME})
    from mirl.downstream import downstream  # after parsing: see the module's docstring
    from mirl.edge import guarded
    return guarded(lambda: downstream(bound_dataset(dataset, config), config))
