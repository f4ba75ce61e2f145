"""An encoder to use outside MIRL: its weights alone, and the preprocessing a user must repeat.

`python -m mirl.export CHECKPOINT --out DIR` writes `DIR/encoder.pth`, a plain torchvision state dict
without the classifier (`torchvision.models.<arch>()` loads it with `strict=False`, leaving only the
classifier missing), and `DIR/preprocessing.json`: how an image was turned into the network's input
during training and evaluation (the reader and its windows or normalisation, the geometry, the input
size, the normalisation constants) and a torchvision transform that matches it. It takes a pretraining
checkpoint (its encoder) or a downstream one (the network without its head).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mirl.augment import CENTRE_CROP, IMAGENET_MEAN, IMAGENET_STD, source_side
from mirl.checkpoints import load_checkpoint, reading_state, save_checkpoint
from mirl.config import identity_digest
from mirl.edge import guarded
from mirl.errors import CheckpointError
from mirl.flags import TIMM_PREFIX, VOLUME_ENCODERS, OneLineParser, image_size
from mirl.imaging import BRAIN_WINDOW, SOFT_TISSUE_WINDOW, SUBDURAL_WINDOW
from mirl.models import architecture, build_encoder, known_architecture
from mirl.run_files import atomic_write_text, prepare_output_dir
from mirl.volume_views import VOLUME_MEAN, VOLUME_STD, window_for

# What MIRL's one reader (`mirl.datasets.decode_record`) does to each kind of file, whatever the dataset.
DECODING = {
    "dicom": {"reader": "DICOM (pydicom), its middle frame when multi-frame",
              "grey CT": {"values": "Hounsfield units: stored value x RescaleSlope + RescaleIntercept",
                          "channels": [{"window": name, "centre": centre, "width": width}
                                       for name, (centre, width) in (("brain", BRAIN_WINDOW),
                                                                     ("subdural", SUBDURAL_WINDOW),
                                                                     ("soft tissue", SOFT_TISSUE_WINDOW))],
                          "to_uint8": "each window clipped to [centre - width / 2, centre + width / 2] and "
                                      "scaled to 0..255"},
              "other grey": "scaled from its 1st to its 99th intensity percentile to 0..255 (MONOCHROME1 "
                            "inverted), repeated to three channels",
              "colour": "R, G, B scaled by their bit depth to 0..255"},
    "photo": {"reader": "JPEG, PNG or TIFF (Pillow)", "colour or 8-bit grey": "R, G, B as stored (grey repeated)",
              "grey deeper than 8 bits": "scaled from its 1st to its 99th percentile to 0..255, repeated to three "
                                         "channels"},
    "nifti": {"reader": "NIfTI (nibabel), one 2-D axial slice of one frame",
              "to_uint8": "each volume scaled from its 1st to its 99th intensity percentile to 0..255",
              "channels": "the grey slice repeated three times"},
}


def encoder_from_checkpoint(path: Path) -> tuple[torch.nn.Module, dict]:
    """The encoder of a MIRL checkpoint (pretraining: its encoder; downstream: the network without its
    classifier) and the checkpoint's other fields."""
    checkpoint = load_checkpoint(path)
    arch = checkpoint.get("arch") if isinstance(checkpoint, dict) else None
    if not known_architecture(arch):
        raise CheckpointError(f"{path} is not a MIRL checkpoint with a known architecture")
    head = architecture(arch).classifier_prefix
    encoder, _ = build_encoder(arch)
    with reading_state(path):
        weights = checkpoint.get("encoder") or {k: v for k, v in checkpoint.get("model", {}).items()
                                                if not k.startswith(head)}
        encoder.load_state_dict(weights)
    return encoder, {k: v for k, v in checkpoint.items() if k not in ("encoder", "model")}


def loader_call(arch: str) -> str:
    """The call that builds the architecture outside MIRL, for `encoder.pth` to load into."""
    if arch in VOLUME_ENCODERS:
        depth = arch.removeprefix("resnet").removesuffix("_3d")
        return (f"monai.networks.nets.resnet{depth}(spatial_dims=3, n_input_channels=1, conv1_t_stride=2, "
                "bias_downsample=False)")
    if arch.startswith(TIMM_PREFIX):
        return f"timm.create_model({arch.removeprefix(TIMM_PREFIX)!r})"
    return f"torchvision.models.{arch}()"


def checkpoint_image_size(fields: dict) -> int | None:
    """The input size the checkpoint's network was trained at, when it says."""
    size = fields.get("image_size", (fields.get("run") or {}).get("image_size"))
    return size if isinstance(size, int) else None


def checkpoint_image_kinds(fields: dict) -> list[str]:
    """The kinds of file the checkpoint's images were read from (every kind, for an older MIRL's checkpoint)."""
    kinds = fields.get("image_kinds", (fields.get("data") or {}).get("image_kinds"))
    return [k for k in kinds if k in DECODING] if isinstance(kinds, list) else sorted(DECODING)


def preprocessing(kinds: list[str], image_size: int) -> dict:
    """What an image goes through before the network, in MIRL's evaluation view: the decoding of each kind
    of file the run read, then the geometry and normalisation."""
    source = source_side(image_size)
    crop = round(source * CENTRE_CROP)
    return {
        "decoding": {kind: DECODING[kind] for kind in kinds},
        "geometry": {"source": f"shorter side resized to {source} px, longer side centre-cropped to a square",
                     "centre_crop_fraction": CENTRE_CROP, "input_size": image_size},
        "normalisation": {"scale": "uint8 / 255", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        # crop, then shrink: shrinking first to round(input / 0.875) would change the scale by the rounding
        "torchvision_equivalent": f"Resize({source}), CenterCrop({crop}), Resize({image_size}), ToTensor(), "
                                  f"Normalize(mean={list(IMAGENET_MEAN)}, std={list(IMAGENET_STD)})",
    }


def volume_preprocessing(fields: dict) -> dict:
    """What a volume goes through before a 3-D encoder (`mirl.volumes`, `mirl.volume_views`), from the
    checkpoint's record of its grid."""
    size, voxel, intensity = fields["volume_size"], fields.get("voxel_size"), fields["intensity"]
    level, width = window_for(intensity)
    return {
        "decoding": {
            "dicom series": "slices of one SeriesInstanceUID ordered along the slice normal (ImagePositionPatient "
                            "on ImageOrientationPatient's row x column); slices of another size or orientation, or "
                            "at a repeated position, left out; gaps interpolated linearly at the real positions",
            "nifti": "the array's third axis as depth (D x H x W = axes 2, 0, 1), not reoriented; a 4-D cine by frame",
            "values": "CT in Hounsfield units clamped to -1024..3071" if intensity == "hu" else
                      "grey levels: the volume's 1st to 99th intensity percentile scaled to 0..255 (CT through the "
                      "soft-tissue window, level 40, width 380)"},
        "geometry": {"voxel_size_mm": voxel, "input_size": size,
                     "resampling": "to the voxel size (area averaging on axes that shrink, trilinear on axes that "
                                   "grow), centred and cropped or padded (air or black) to the input size"
                     if voxel else "each axis of the whole volume resampled to the input size"},
        "window": {"level": level, "width": width, "to_unit": "clipped to [level - width / 2, level + width / 2], "
                                                              "scaled to 0..1"},
        "normalisation": {"mean": VOLUME_MEAN, "std": VOLUME_STD, "channels": 1},
    }


def export(checkpoint: Path, out: Path, image_size: int | None) -> None:
    encoder, fields = encoder_from_checkpoint(checkpoint)
    size = image_size or checkpoint_image_size(fields)
    volumes = fields.get("dims") == 3
    if size is None and not volumes:
        raise CheckpointError(f"{checkpoint} does not record its input size (written by an older MIRL); "
                              "pass --image-size")
    prepare_output_dir(out)
    save_checkpoint(encoder.state_dict(), out / "encoder.pth")
    dataset = str(fields.get("dataset", ""))
    identity = fields.get("run")
    record = {"arch": fields["arch"], "method": fields.get("method"), "dataset": dataset,
              "run_id": identity_digest(identity) if isinstance(identity, dict) else None,
              "source_checkpoint": str(checkpoint.resolve()),
              "load": f"{loader_call(fields['arch'])}.load_state_dict(torch.load('encoder.pth', weights_only=True), "
              "strict=False): only the classifier is missing",
              **(volume_preprocessing(fields) if volumes else preprocessing(checkpoint_image_kinds(fields), size))}
    atomic_write_text(out / "preprocessing.json", json.dumps(record, indent=2) + "\n")
    print(f"wrote {out / 'encoder.pth'} ({fields['arch']}) and {out / 'preprocessing.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m mirl.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a pretraining or downstream checkpoint.pth")
    parser.add_argument("--out", type=Path, required=True, help="folder for encoder.pth and preprocessing.json")
    parser.add_argument("--image-size", type=image_size, default=None, help="default: the checkpoint's")
    args = parser.parse_args(argv)
    return guarded(lambda: export(args.checkpoint, args.out, args.image_size))


if __name__ == "__main__":
    sys.exit(main())
