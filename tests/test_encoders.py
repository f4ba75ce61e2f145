"""Encoders from torchvision and timm: what MIRL builds, what it refuses in one line, and weights it starts from."""
import pytest
import timm
import torch
import torchvision
from conftest import TINY, assert_one_line_error, run_entry, run_in_process

from mirl.encoders import architecture, build_encoder, start_encoders_from
from mirl.errors import InputError
from mirl.methods import METHODS
from mirl.moco import MoCo, SplitBatchNorm2d


def test_a_timm_convnext_is_an_encoder_whose_weights_timm_loads_back():
    encoder, width = build_encoder("timm:convnext_atto")
    assert width == 320 and encoder(torch.randn(2, 3, 32, 32)).shape == (2, 320)
    plain = timm.create_model("convnext_atto", pretrained=False, num_classes=0)
    plain.load_state_dict(encoder.state_dict())  # strict: the same names, the classifier aside
    assert architecture("timm:convnext_atto").classifier_prefix == "head.fc."


def test_moco_splits_the_batchnorm_of_a_timm_resnet_and_needs_none_for_layernorm():
    model = MoCo("timm:resnet18", queue_size=16, bn_splits=4)
    plain = sum(type(m) is torch.nn.BatchNorm2d for m in model.encoder_q.modules())
    assert plain == 0 and sum(isinstance(m, SplitBatchNorm2d) for m in model.encoder_q.modules()) == 20
    loss, _ = MoCo("timm:convnext_atto", queue_size=16, bn_splits=4)(torch.randn(4, 3, 32, 32),
                                                                       torch.randn(4, 3, 32, 32))
    assert torch.isfinite(loss)


def test_batchnorm_that_cannot_be_split_or_a_vision_transformer_is_refused_in_one_line():
    with pytest.raises(InputError, match="BatchNormAct2d.*--bn-splits 1"):
        MoCo("timm:efficientnet_b0", queue_size=16, bn_splits=8)
    MoCo("timm:efficientnet_b0", queue_size=16, bn_splits=1)
    assert architecture("timm:vit_tiny_patch16_224").transformer and not architecture("resnet18").transformer
    for method in ("moco", "mocov2", "simclr", "byol"):  # their recipes are the CNN papers'
        with pytest.raises(InputError, match="vision transformer"):
            METHODS[method].recipe_for(transformer=True)
    assert METHODS["dino"].recipe_for(transformer=True).optimizer == "adamw"
    with pytest.raises(InputError, match="timm has no model"):
        architecture("timm:no_such_net")


def test_init_weights_start_every_encoder_of_a_method_from_them():
    torch.manual_seed(1)
    weights = torchvision.models.resnet18().state_dict()
    model = MoCo("resnet18", queue_size=16, bn_splits=2)
    start_encoders_from(model, {k: v for k, v in weights.items() if not k.startswith("fc.")}, "w.pth", "resnet18")
    for encoder in (model.encoder_q, model.encoder_k):
        assert torch.equal(encoder.state_dict()["conv1.weight"], weights["conv1.weight"])
        assert torch.equal(encoder.state_dict()["layer4.1.bn2.running_var"], weights["layer4.1.bn2.running_var"])


def test_a_bad_arch_or_init_file_is_one_line(rsna_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", "--data-root", rsna_root, "--arch", "resnet101")
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1 and "timm:NAME" in lines[0]
    result = run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", "--data-root", rsna_root, "--arch",
                       "timm:vit_small_patch16_224", "--output-dir", tmp_path / "vit", "--split-dir", tmp_path / "s")
    assert_one_line_error(result, "vision transformer")
    (tmp_path / "w.pth").write_bytes(b"not a state dict")
    result = run_entry(capsys, "RSNA_MoCo", "trainSimCLR.py", "--data-root", rsna_root, "--init-weights",
                       tmp_path / "w.pth", "--output-dir", tmp_path / "o", "--split-dir", tmp_path / "s", *TINY)
    assert_one_line_error(result, "w.pth")


@pytest.mark.slow
def test_a_timm_encoder_pretrains_and_probes_end_to_end_from_local_weights(rsna_root, tmp_path):
    weights = tmp_path / "convnext.pth"
    torch.save(timm.create_model("convnext_atto", pretrained=False).state_dict(), weights)
    common = ["--data-root", rsna_root, "--split-dir", tmp_path / "splits", *TINY]
    result = run_in_process("RSNA_MoCo", "trainMoCoV2.py", *common, "--arch", "timm:convnext_atto", "--init-weights",
                        weights, "--output-dir", tmp_path / "p", "--knn-images", "0")
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(tmp_path / "p" / "checkpoint.pth", weights_only=True)
    assert checkpoint["arch"] == "timm:convnext_atto" and checkpoint["data"]["init_weights"] == str(weights)
    result = run_in_process("RSNA_MoCo", "MoCov2_downstream.py", *common, "--arch", "timm:convnext_atto", "--frozen",
                        "--pretrained", tmp_path / "p" / "checkpoint.pth", "--output-dir", tmp_path / "d")
    assert result.returncode == 0, result.stderr
    classifier = timm.create_model("convnext_atto", pretrained=False, num_classes=6)
    classifier.load_state_dict(torch.load(tmp_path / "d" / "checkpoint.pth", weights_only=True)["model"])
