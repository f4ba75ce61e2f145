"""torch.distributed on the CPU (gloo): two processes of batch B must train exactly like one of 2B, and the
scripts run under torchrun."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY, assert_one_line_error, script_folder

from mirl import distributed
from mirl.loaders import readable_batch
from mirl.models import MoCo, SimCLR
from mirl.runtime import resolve_device

B = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images(seed: int, shape: tuple[int, ...] = (3, 32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2 * B, *shape, generator=generator), torch.randn(2 * B, *shape, generator=generator)


def simclr_rank(rank: int, port: int, out: str, arch: str, shape: tuple[int, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(SimCLR(arch, temperature=0.5))
    x1, x2 = images(1, shape)
    mine = slice(rank * B, (rank + 1) * B)
    loss, _ = model(x1[mine], x2[mine])
    loss.backward()
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": {n: p.grad for n, p in model.module.named_parameters()}}, out)
    dist.destroy_process_group()


def moco_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = MoCo("resnet18", queue_size=4 * B, momentum=0.0).eval()  # eval: keys independent of batch mates
    im_q, im_k = images(2)
    mine = slice(rank * B, (rank + 1) * B)
    model(im_q[mine], im_k[mine])
    state = model.queue.state_dict()
    torch.save({"keys": state["keys"], "filled": state["filled"]}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("arch,shape", [("resnet18", (3, 32, 32)), ("resnet18_3d", (1, 8, 32, 32))])
def test_two_process_simclr_matches_one_process_of_twice_the_batch(tmp_path, arch, shape):
    """The gathered NT-Xent and the cross-rank BatchNorm (BatchNorm3d for a volume encoder)."""
    out = str(tmp_path / "rank0.pt")
    mp.spawn(simclr_rank, args=(free_port(), out, arch, shape), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    model = SimCLR(arch, temperature=0.5)
    x1, x2 = images(1, shape)
    loss, _ = model(x1, x2)
    loss.backward()
    assert abs(distributed["loss"].item() - loss.item()) < 1e-5
    for name, p in model.named_parameters():
        # equal up to float summation order: within 1e-4 of the layer's largest gradient
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(distributed["grads"][name], p.grad, rtol=0, atol=1e-4 * scale + 1e-8, msg=name)


@pytest.mark.slow
def test_two_process_moco_fills_the_queue_with_both_ranks_keys(tmp_path):
    out = str(tmp_path / "queue")
    mp.spawn(moco_rank, args=(free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    model = MoCo("resnet18", queue_size=4 * B, momentum=0.0, bn_splits=1).eval()
    _, im_k = images(2)
    expected = torch.nn.functional.normalize(model.head_k(model.encoder_k(im_k)), dim=1).detach()
    for state in ranks:
        assert state["filled"].item() == 2 * B
        torch.testing.assert_close(state["keys"][:2 * B], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_scripts_run_under_torchrun_and_only_rank_0_writes(rsna_root, tmp_path):
    """A user's torchrun command: SimCLR pretraining then its fine-tuning, two gloo processes each."""
    def torchrun(script, *args):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               script, *map(str, args)], cwd=script_folder("RSNA_MoCo"), capture_output=True, text=True,
                              timeout=600)
    common = ["--data-root", rsna_root, "--split-dir", tmp_path / "splits", *TINY, "--keep-states"]
    result = torchrun("trainSimCLR.py", "--output-dir", tmp_path / "simclr", *common)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "simclr" / "config.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "simclr").glob("checkpoint*")) == ["checkpoint.pth", "checkpoints"]
    # one state per epoch end, all from rank 0: no temporary file of another rank is left behind
    assert [p.name for p in (tmp_path / "simclr" / "checkpoints").iterdir()] == ["state-e0001-b000000.pth"]
    result = torchrun("SimCLR_downstream.py", "--output-dir", tmp_path / "down", "--pretrained",
                      tmp_path / "simclr" / "checkpoint.pth", *common)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "down" / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["auc_macro"] <= 1.0


def torchrun(folder: str, script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           script, *map(str, args)], cwd=script_folder(folder), capture_output=True, text=True,
                          timeout=600)


def test_each_rank_uses_its_own_gpu_before_the_process_group_starts(monkeypatch):
    """torchrun's LOCAL_RANK picks the GPU, and it becomes the current device before NCCL starts (without it every
    rank's object collectives land on GPU 0)."""
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    device = resolve_device("auto")
    distributed.init_from_environment(device)
    assert device == torch.device("cuda", 3)
    assert calls == [("set_device", torch.device("cuda", 3)), ("init", "nccl")]


def test_unreadable_images_are_replaced_by_readable_ones_of_the_batch():
    images = torch.arange(5).view(5, 1, 1, 1).expand(5, 3, 2, 2).to(torch.uint8)
    labels = torch.arange(5.0).view(5, 1)
    ok = torch.tensor([True, False, True, False, False])
    filled, filled_labels = readable_batch(images, labels, ok)
    assert filled.shape == images.shape  # every rank keeps the same batch size
    assert filled[:, 0, 0, 0].tolist() == [0, 0, 2, 2, 0] and filled_labels.flatten().tolist() == [0, 0, 2, 2, 0]
    assert images[1, 0, 0, 0] == 1  # the loader's batch is not changed in place


@pytest.mark.slow
def test_bad_files_in_one_ranks_share_neither_hang_nor_split_the_ranks(rsna_root, tmp_path):
    """Unreadable slices land in the ranks' shares unevenly; MoCo's all-gathers must still see equal batches on
    every rank, and a state of two processes cannot be resumed by one."""
    data = tmp_path / "data"
    shutil.copytree(rsna_root, data)
    slices = sorted((data / "stage_2_train").glob("*.dcm"))
    corrupted = slices[:40:7]
    for bad in corrupted:
        bad.write_bytes(b"not a DICOM")
    common = ["--data-root", data, "--split-dir", tmp_path / "splits", *TINY, "--batch-size", "8"]
    result = torchrun("RSNA_MoCo", "trainMoCoV2.py", "--output-dir", tmp_path / "mocov2", *common)
    assert result.returncode == 0, result.stderr[-2000:]
    skipped = (tmp_path / "mocov2" / "skipped.csv").read_text().splitlines()[1:]
    assert skipped and {row.split(",")[1] for row in skipped} <= {str(bad) for bad in corrupted}
    result = subprocess.run([sys.executable, "trainMoCoV2.py", "--output-dir", tmp_path / "mocov2", "--resume", "auto",
                             *map(str, common), "--epochs", "2"], cwd=script_folder("RSNA_MoCo"), capture_output=True,
                            text=True, timeout=600)
    assert_one_line_error(result, "world_size")
