"""Datasets: how each one is laid out on disk, what its labels mean, and one torch Dataset to read them.

A dataset is described once by a `DatasetDescription`: its classes, whether it is multi-label, a
function that lists the labelled images under a data root, one that lists the images pretraining
may use, and one that says which patient (or lesion) an image belongs to. Pixels of every format
are decoded by the one `decode_record`. Splits, pretraining, downstream training and metrics all
work from the description, so a new dataset is a reader, a sample writer and a description. A dataset
that holds volumes says how in its `VolumeFormat`; `description.in_dims(3)` reads it as volumes
(`mirl.datasets.volumes`).
"""
from __future__ import annotations

from mirl.datasets.acdc import ACDC, ACDC_CLASSES, read_info_cfg
from mirl.datasets.csv_files import read_label_csv, with_label_csv
from mirl.datasets.isic import ISIC, ISIC_CLASSES
from mirl.datasets.records import (
           DatasetDescription,
           DecodedImages,
           ImageDataset,
           ImageRecord,
           decode_record,
           find_images,
           image_kinds,
           record_group,
           source_files,
           source_key,
           square_uint8,
)
from mirl.datasets.rsna import RSNA, RSNA_CLASSES, read_rsna_labels

DATASETS: dict[str, DatasetDescription] = {"rsna": RSNA, "isic": ISIC, "acdc": ACDC}

__all__ = ["ACDC", "ACDC_CLASSES", "DATASETS", "ISIC", "ISIC_CLASSES", "RSNA", "RSNA_CLASSES", "DatasetDescription",
           "source_files", "source_key",
           "DecodedImages", "ImageDataset", "ImageRecord", "decode_record", "find_images", "image_kinds",
           "read_info_cfg",
           "read_label_csv", "read_rsna_labels", "record_group", "square_uint8", "with_label_csv"]
