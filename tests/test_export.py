"""`python -m mirl.export`: encoder weights that plain torchvision loads, and preprocessing a user can repeat."""
import json

import numpy as np
import pytest
import torch
import torchvision
from torchvision.transforms import v2

from mirl.augment import evaluation_view
from mirl.encoders import build_encoder
from mirl.export import main
from mirl.imaging import HEMORRHAGE_WINDOWS


@pytest.fixture
def pretraining_checkpoint(tmp_path):
    torch.manual_seed(0)
    encoder, _ = build_encoder("resnet18")
    path = tmp_path / "checkpoint.pth"
    # CT DICOMs pretrained from the ISIC folder's scripts: the decoding recorded is the reader's for DICOM
    torch.save({"method": "mocov2", "arch": "resnet18", "dataset": "isic", "image_size": 32,
                "data": {"image_kinds": ["dicom"]}, "encoder": encoder.state_dict()}, path)
    return path, encoder.eval()


def test_torchvision_loads_the_exported_encoder_and_computes_the_same_features(pretraining_checkpoint, tmp_path):
    path, encoder = pretraining_checkpoint
    assert main([str(path), "--out", str(tmp_path / "export")]) == 0
    plain = torchvision.models.resnet18()
    missing, unexpected = plain.load_state_dict(torch.load(tmp_path / "export" / "encoder.pth", weights_only=True),
                                                strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    plain.fc = torch.nn.Identity()
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(plain.eval()(images), encoder(images), atol=1e-5)


def test_the_recorded_preprocessing_matches_mirls_evaluation_view(pretraining_checkpoint, tmp_path):
    path, _ = pretraining_checkpoint
    main([str(path), "--out", str(tmp_path / "export")])
    record = json.loads((tmp_path / "export" / "preprocessing.json").read_text())
    assert record["geometry"]["input_size"] == 32 and record["arch"] == "resnet18"
    assert list(record["decoding"]) == ["dicom"]  # not ISIC's photos: the reader went by the files' kind
    assert [(c["centre"], c["width"]) for c in record["decoding"]["dicom"]["grey CT"]["channels"]] == \
        list(HEMORRHAGE_WINDOWS)
    # the stored image MIRL evaluates is the source square (2 x input side); a smooth one, so that the
    # two resampling orders (crop then shrink, shrink then crop) agree up to interpolation
    y, x = np.mgrid[0:64, 0:64]
    image = np.stack([x * 4, y * 4, (x + y) * 2], axis=0).clip(0, 255).astype(np.uint8)
    ours = evaluation_view(torch.from_numpy(image)[None], 32)[0]
    source, crop, size = (int(part.split(")")[0]) for part in record["torchvision_equivalent"].split("(")[1:4])
    assert (source, crop, size) == (64, 56, 32)
    theirs = v2.Compose([v2.Resize(source, antialias=True), v2.CenterCrop(crop), v2.Resize(size, antialias=True),
                         v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize(record["normalisation"]["mean"], record["normalisation"]["std"])])(
        torch.from_numpy(image))
    assert (ours - theirs).abs().max() < 0.02  # under 1.2 grey levels


def test_a_checkpoint_that_is_not_mirls_is_one_line(tmp_path, capsys):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    assert main([str(tmp_path / "other.pth"), "--out", str(tmp_path / "export")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_an_export_image_size_below_the_minimum_is_one_line(pretraining_checkpoint, tmp_path, capsys):
    path, _ = pretraining_checkpoint
    with pytest.raises(SystemExit) as stopped:
        main([str(path), "--out", str(tmp_path / "export"), "--image-size", "-5"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 32" in err[0] and not (tmp_path / "export").exists()
