"""A t-SNE picture of what an encoder learned: its features of the test split, coloured by class.

`python -m mirl.embed CHECKPOINT --data-root DIR --split-dir DIR [--out tsne.png]` takes a
pretraining checkpoint (its encoder) or a downstream one (the network without its head), at the input
size it was trained at; `--labels CSV` colours a user's own data by its classes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.manifold import TSNE

from mirl.datasets import DATASETS, with_label_csv
from mirl.edge import guarded
from mirl.errors import CheckpointError
from mirl.export import checkpoint_image_size, encoder_from_checkpoint
from mirl.flags import OneLineParser, image_size, non_negative_int, positive_int
from mirl.monitor import extract_features, sample_records
from mirl.runtime import resolve_device, resolve_precision
from mirl.spatial import InputSpace
from mirl.splits import load_splits
from mirl.volumes import VolumeGeometry


def class_of(labels: np.ndarray, classes: tuple[str, ...]) -> list[str]:
    """One colour per image: its class, or for multi-label its first positive class ('none' if none)."""
    return [classes[int(np.argmax(row))] if row.any() else "none" for row in labels]


def embed(args: argparse.Namespace) -> None:
    encoder, fields = encoder_from_checkpoint(args.checkpoint)
    description = DATASETS.get(args.dataset or str(fields.get("dataset", "")))
    if description is None:
        raise CheckpointError(f"{args.checkpoint} does not say its dataset; pass --dataset")
    if args.labels is not None:
        description = with_label_csv(description, args.labels, args.data_root, args.group_column)
    size = args.image_size or checkpoint_image_size(fields) or 224
    inputs = InputSpace(size)
    if fields.get("dims") == 3:  # a volume encoder: its run's grid, on the dataset read as volumes
        description = description.in_dims(3)
        inputs = InputSpace(size, VolumeGeometry(tuple(fields["volume_size"]), fields.get("voxel_size") and
                                                 tuple(fields["voxel_size"]), fields["intensity"]))
    description.check_root(args.data_root)
    records = description.find_labelled(args.data_root)
    test_ids = set(load_splits(description, records, args.split_dir)["test"])
    test = sample_records([r for r in records if r.image_id in test_ids], args.max_images, seed=0)
    device = resolve_device(args.device)
    features, labels = extract_features(encoder.to(device), test, len(description.classes), inputs,
                                         device, resolve_precision("auto", device), 64, args.workers)
    points = TSNE(n_components=2, perplexity=min(30.0, (len(features) - 1) / 3), init="pca",
                  random_state=0).fit_transform(features)
    names = class_of(labels, description.classes)
    figure = Figure(figsize=(6.5, 5.5))
    axis = figure.add_subplot()
    for name in dict.fromkeys(names):
        mine = np.array([n == name for n in names])
        axis.scatter(points[mine, 0], points[mine, 1], s=10, label=name, alpha=0.8)
    axis.set_title(f"t-SNE of {args.checkpoint.parent.name} features, {description.name} test split")
    axis.set_xticks([])
    axis.set_yticks([])
    axis.legend(fontsize=8, markerscale=2)
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out} ({len(features)} test images)")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m mirl.embed", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--split-dir", type=Path, required=True, help="the split files the runs used")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default=None, help="default: the checkpoint's")
    parser.add_argument("--out", type=Path, default=Path("tsne.png"))
    parser.add_argument("--image-size", type=image_size, default=None,
                        help="default: the checkpoint's (224 for one that does not say)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="your own label CSV, as given to the scripts (colours by its classes)")
    parser.add_argument("--group-column", default=None, metavar="NAME", help="with --labels: its patient column")
    parser.add_argument("--max-images", type=positive_int, default=2000)
    parser.add_argument("--workers", type=non_negative_int, default=2)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return guarded(lambda: embed(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
