"""Typed run configs: built from a script's flags or by hand, frozen, and giving the flags back for a relaunch."""
import dataclasses
from dataclasses import asdict
from pathlib import Path

import pytest

from mirl.cli import downstream_parser, pretrain_parser
from mirl.config import DownstreamConfig, PretrainConfig, RunConfig
from mirl.errors import InputError
from mirl.models import METHODS

FOLDER = Path(__file__).resolve().parent.parent / "RSNA_MoCo"


def test_a_scripts_flags_become_a_config_with_the_methods_own_options_apart():
    args = pretrain_parser("rsna", "mocov2", FOLDER).parse_args(["--queue-size", "64", "--temperature", "0.5",
                                                                 "--epochs", "3"])
    config = PretrainConfig.from_flags({**vars(args), "method": "mocov2"})
    assert config.epochs == 3 and config.options["queue_size"] == 64 and config.options["temperature"] == 0.5
    assert not set(config.options) & {f.name for f in dataclasses.fields(PretrainConfig)}
    assert {k: v for k, v in config.flags().items() if k in vars(args)} == {k: v for k, v in vars(args).items()
                                                                           if k != "config"}


def test_configs_are_frozen_all_the_way_down():
    config = PretrainConfig(method="moco", data_root=Path("d"), output_dir=Path("o"), split_dir=Path("s"),
                            options={"queue_size": 8})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    with pytest.raises(TypeError):
        config.options["queue_size"] = 16


def test_parsers_take_their_defaults_from_the_configs():
    pretraining = vars(pretrain_parser("isic", "simclr", FOLDER).parse_args([]))
    downstream = vars(downstream_parser("isic", "simclr", FOLDER).parse_args([]))
    for name in ("batch_size", "image_size", "workers", "seed", "save_every", "keep", "lr", "device", "precision"):
        assert pretraining[name] == downstream[name] == getattr(RunConfig, name)
    assert pretraining["knn_images"] == PretrainConfig.knn_images and pretraining["positives"] == "views"
    assert downstream["encoder_lr_scale"] == DownstreamConfig.encoder_lr_scale


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_completes_its_options_and_refuses_one_it_lacks(method):
    spec = METHODS[method]
    assert asdict(spec.options({})) == spec.option_defaults()
    with pytest.raises(InputError, match="no option"):
        spec.options({"no_such_option": 1})


def test_label_aware_pretraining_is_refused_for_a_method_without_it():
    from mirl.datasets import RSNA
    from mirl.pretrain import settled_config
    config = PretrainConfig(method="simclr", data_root=Path("d"), output_dir=Path("o"), split_dir=Path("s"),
                            supervised=True)
    with pytest.raises(InputError, match="SimCLR has no label-aware form"):
        settled_config(METHODS["simclr"], config, None, RSNA)
    assert settled_config(METHODS["moco"], dataclasses.replace(config, method="moco"), None, RSNA).supervised
