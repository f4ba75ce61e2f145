"""Nothing a user trained is lost: exact resume after SIGKILL, Ctrl-C, non-finite losses, refused
overwrites and checkpoints that carry code."""
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import assert_one_line_error, run_entry, run_script, script_folder
from PIL import Image

from mirl.augment import source_side
from mirl.checkpoints import CheckpointStore, load_checkpoint
from mirl.datasets import ImageDataset, ImageRecord
from mirl.errors import CheckpointError
from mirl.loaders import make_loader
from mirl.run_files import RunLog
from mirl.training import Trainer

pytestmark = pytest.mark.slow  # end-to-end runs of the scripts

# 6 batches of 16 per epoch on the 16-patient sample; a state every 2 steps
SMALL = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--workers", "0", "--device", "cpu",
         "--save-every", "2", "--deterministic", "--keep-states"]
PRETRAIN = [*SMALL, "--epochs", "2", "--queue-size", "32", "--knn-images", "0"]
FINETUNE = [*SMALL, "--epochs", "2", "--fraction", "50"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def killed_then_resumed(script: str, args: list, out: Path, kill_at: str, sig: int = signal.SIGKILL) -> str:
    """Start `script`, send `sig` as soon as the state `kill_at` exists, then rerun with --resume auto;
    returns the resumed run's stderr."""
    command = [sys.executable, script, *map(str, args), "--output-dir", str(out)]
    process = subprocess.Popen(command, cwd=script_folder("RSNA_MoCo"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / kill_at).exists():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(sig)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), stderr[-2000:]
    resumed = run_script("RSNA_MoCo", script, *args, "--output-dir", out, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return stderr + resumed.stderr


@pytest.fixture(scope="module")
def unbroken(rsna_root, tmp_path_factory):
    """Uninterrupted MoCo v2 pretraining and fine-tuning of the same seed."""
    out = tmp_path_factory.mktemp("unbroken")
    common = ["--data-root", rsna_root, "--split-dir", out / "splits"]
    result = run_script("RSNA_MoCo", "trainMoCoV2.py", *common, *PRETRAIN, "--output-dir", out / "pretrain")
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_script("RSNA_MoCo", "MoCov2_downstream.py", *common, *FINETUNE, "--output-dir", out / "finetune",
                        "--pretrained", out / "pretrain" / "checkpoint.pth")
    assert result.returncode == 0, result.stderr[-2000:]
    return out, common


def test_pretraining_killed_mid_epoch_resumes_to_identical_weights(unbroken, tmp_path):
    out, common = unbroken
    log = killed_then_resumed("trainMoCoV2.py", [*common, *PRETRAIN], tmp_path, "state-e0001-b000002.pth")
    assert "resuming from" in log and "(epoch 1, batch " in log
    assert_identical(weights(out / "pretrain" / "checkpoint.pth"), weights(tmp_path / "checkpoint.pth"))
    # the queue and its pointer are part of the model's state: compared above, and really filled
    assert int(weights(tmp_path / "checkpoint.pth")["queue.filled"]) == 32


def test_downstream_killed_mid_epoch_resumes_to_identical_weights_and_metrics(unbroken, tmp_path):
    out, common = unbroken
    args = [*common, *FINETUNE, "--pretrained", out / "pretrain" / "checkpoint.pth"]
    killed_then_resumed("MoCov2_downstream.py", args, tmp_path, "state-e0000-b000002.pth")
    assert_identical(weights(out / "finetune" / "checkpoint.pth"), weights(tmp_path / "checkpoint.pth"))
    assert (out / "finetune" / "metrics.json").read_text() == (tmp_path / "metrics.json").read_text()


def test_the_same_seed_gives_the_same_weights_whatever_the_cache_holds(unbroken, tmp_path):
    out, common = unbroken  # trained without --cache; now with an empty cache folder, which the run builds
    result = run_script("RSNA_MoCo", "trainMoCoV2.py", *common, *PRETRAIN, "--cache", tmp_path / "cache",
                        "--output-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert any((tmp_path / "cache").iterdir())
    assert_identical(weights(out / "pretrain" / "checkpoint.pth"), weights(tmp_path / "run" / "checkpoint.pth"))


def test_ctrl_c_saves_a_state_and_the_run_continues_from_it(unbroken, tmp_path):
    out, common = unbroken
    log = killed_then_resumed("trainMoCoV2.py", [*common, *PRETRAIN], tmp_path, "state-e0000-b000002.pth",
                              signal.SIGINT)
    assert "stopped: SIGINT received: saved the state" in log and "Traceback" not in log
    assert_identical(weights(out / "pretrain" / "checkpoint.pth"), weights(tmp_path / "checkpoint.pth"))


def test_only_the_newest_states_are_kept_and_checkpoint_is_the_newest(unbroken):
    out, _ = unbroken
    states = sorted(p.name for p in (out / "pretrain" / "checkpoints").iterdir())
    assert states == ["state-e0001-b000006.pth", "state-e0002-b000000.pth"]  # --keep 2
    published = load_checkpoint(out / "pretrain" / "checkpoint.pth")
    assert (published["epoch"], published["batch"]) == (2, 0)
    assert os.path.samefile(out / "pretrain" / "checkpoint.pth", out / "pretrain" / "checkpoints" / states[-1])


def test_an_output_dir_with_states_is_not_overwritten(unbroken, capsys):
    out, common = unbroken
    before = (out / "pretrain" / "checkpoint.pth").read_bytes()
    result = run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", *common, *PRETRAIN, "--output-dir", out / "pretrain")
    assert_one_line_error(result, "already holds training states", "--resume auto")
    assert (out / "pretrain" / "checkpoint.pth").read_bytes() == before


@pytest.mark.parametrize("script,change,word", [
    ("trainMoCo.py", [], "method"),  # a MoCo v2 state given to MoCo v1
    ("trainMoCoV2.py", ["--arch", "resnet50"], "arch"),
    ("trainMoCoV2.py", ["--batch-size", "8"], "batch_size"),
    # each of these trains another run from the same point: refused, naming the field and both values
    ("trainMoCoV2.py", ["--seed", "1"], "seed 0 -> 1"),
    ("trainMoCoV2.py", ["--temperature", "0.5"], "temperature 0.2 -> 0.5"),
    ("trainMoCoV2.py", ["--moco-momentum", "0.99"], "moco_momentum 0.999 -> 0.99"),
    ("trainMoCoV2.py", ["--augment", "ct"], 'augment "grey" -> "ct"'),
])
def test_resuming_a_state_of_another_run_is_one_line(unbroken, tmp_path, capsys, script, change, word):
    out, common = unbroken
    args = [*common, *PRETRAIN, *change, "--output-dir", tmp_path, "--resume", out / "pretrain" / "checkpoint.pth"]
    assert_one_line_error(run_entry(capsys, "RSNA_MoCo", script, *args), word)


def test_resuming_a_linear_probe_with_another_pretrained_encoder_is_refused_at_start(unbroken, tmp_path, capsys):
    out, common = unbroken
    probe = [*common, *SMALL, "--epochs", "1", "--fraction", "50", "--frozen", "--output-dir", tmp_path / "probe"]
    first = run_script("RSNA_MoCo", "MoCov2_downstream.py", *probe, "--pretrained", out / "pretrain" / "checkpoint.pth")
    assert first.returncode == 0, first.stderr[-2000:]
    other = load_checkpoint(out / "pretrain" / "checkpoint.pth")
    other["encoder"] = {k: v + 1 if v.is_floating_point() else v for k, v in other["encoder"].items()}
    torch.save(other, tmp_path / "other.pth")
    metrics = (tmp_path / "probe" / "metrics.json").read_text()
    result = run_entry(capsys, "RSNA_MoCo", "MoCov2_downstream.py", *probe, "--pretrained", tmp_path / "other.pth",
                       "--resume", "auto")
    assert_one_line_error(result, "belongs to another run", "pretrained")
    assert (tmp_path / "probe" / "metrics.json").read_text() == metrics


def test_an_unwritable_output_dir_is_one_line(unbroken, tmp_path, capsys):
    _, common = unbroken
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", *common, *PRETRAIN, "--output-dir", blocker / "run")
    assert_one_line_error(result, "--output-dir", "cannot be written")


def test_a_non_finite_loss_stops_with_one_line_naming_the_step(unbroken, tmp_path):
    _, common = unbroken
    result = run_script("RSNA_MoCo", "trainMoCoV2.py", *common, *PRETRAIN, "--lr", "1e30", "--output-dir", tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "at step" in errors[0] and "Traceback" not in result.stderr


def test_a_non_finite_loss_keeps_the_last_good_state(tmp_path):
    """Steps 1-4 are fine and saved every 2 steps; step 5's loss is NaN: the state after step 4 stays."""
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i in range(16):
        path = images / f"{i}.png"
        torch.manual_seed(i)
        Image.fromarray((torch.rand(8, 8, 3) * 255).byte().numpy()).save(path)
        records.append(ImageRecord(str(i), path))
    loader = make_loader(ImageDataset(records, 8, 1), batch_size=2, workers=0, shuffle=True, drop_last=True, seed=0)
    side = source_side(8)  # loaders deliver images at the side augmentation crops from
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * side * side, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    calls = []

    def step_loss(batch: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        loss = model(batch.float() / 255).square().mean()
        return loss * float("nan") if len(calls) == 5 else loss

    store = CheckpointStore(tmp_path / "run", keep=5, publish=True)
    trainer = Trainer(step_loss, loader, optimizer, None, torch.device("cpu"), None, store, 2,
                      lambda: {"model": model.state_dict()})
    (tmp_path / "run").mkdir()
    with pytest.raises(FloatingPointError, match=r"at step 5.*state-e0000-b000004\.pth"):
        trainer.fit(1, RunLog(tmp_path / "run"), lambda epoch: {}, model.train)
    assert [p.name for p in store.states()] == ["state-e0000-b000002.pth", "state-e0000-b000004.pth"]
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "run" / "checkpoint.pth")["model"].values())


class _RunsCode:
    """Unpickling this object would run a shell command: the attack a checkpoint file can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(unbroken, tmp_path, capsys):
    out, common = unbroken
    marker = tmp_path / "code_ran"
    crafted = tmp_path / "checkpoint.pth"
    torch.save({"method": "mocov2", "arch": "resnet18", "encoder": {}, "payload": _RunsCode(marker)}, crafted,
               pickle_protocol=pickle.HIGHEST_PROTOCOL)
    for script, flags in (("MoCov2_downstream.py", ["--pretrained", crafted, *FINETUNE]),
                          ("trainMoCoV2.py", ["--resume", crafted, *PRETRAIN])):
        result = run_entry(capsys, "RSNA_MoCo", script, *common, *flags, "--output-dir", tmp_path / script)
        assert_one_line_error(result, str(crafted), "not a loadable MIRL checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(crafted)
    assert not marker.exists()
