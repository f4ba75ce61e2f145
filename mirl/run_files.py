"""A run's folder: proven writable and held by one run at a time, its store of training states, its
TensorBoard events and JSON records, each file written atomically."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, TypeVar

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so runs on one output dir are not kept apart
    fcntl = None

import numpy as np
import torch
import torchvision
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from mirl.checkpoints import CheckpointStore, resume_state, writing
from mirl.distributed import is_main_process
from mirl.errors import OutputError

T = TypeVar("T")


def open_run(output_dir: Path, keep: int, publish: bool,
             resume: str | None) -> tuple[CheckpointStore, Path | None, dict | None]:
    """Before any heavy work: the output dir proven writable and held by this run alone, its store of
    training states, and the state `--resume` asks to continue from (its path and contents; None for a
    fresh run)."""
    prepare_output_dir(output_dir)
    lock_output_dir(output_dir)
    store = CheckpointStore(output_dir, keep, publish)
    store.remove_leftovers()
    resume_from, resumed = resume_state(resume, store)
    return store, resume_from, resumed


PROBE_BYTES = 2 ** 20


def prepare_output_dir(path: Path) -> None:
    """Create the output dir and prove it writable now, not after hours of training."""
    prove_writable(path, "--output-dir")


def prove_writable(path: Path, flag: str) -> None:
    """Create the folder `flag` names and write a megabyte into it (an empty file can be created on a full
    disk), or stop with one OutputError."""
    probe = path / f".write-test.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise OutputError(f"{flag} {path} cannot be written ({error.strerror or type(error).__name__})") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # not a folder at all: nothing was written
            pass


_HELD_LOCKS: dict[Path, IO[str]] = {}


def lock_output_dir(path: Path) -> None:
    """Hold `path/.lock` until `release_output_dirs` (rank 0's, under torchrun), so a second run started on
    the same output dir stops at once instead of writing its records beside this one's. The operating system
    releases the lock when the process ends, however it ends."""
    key = path.resolve()
    if fcntl is None or not is_main_process() or key in _HELD_LOCKS:
        return
    handle = open(path / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip()
        handle.close()
        raise OutputError(f"another run{f' (process {owner})' if owner.isdigit() else ''} is writing to {path}; "
                          "wait for it to end or choose another --output-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _HELD_LOCKS[key] = handle


def release_output_dirs() -> None:
    """Let other runs use the output dirs this process locked (the scripts' edge calls it when a run ends)."""
    for handle in _HELD_LOCKS.values():
        handle.close()
    _HELD_LOCKS.clear()


@dataclass
class RunLog:
    """Where a run writes: TensorBoard events and JSON files, from the main process only.

    Every TensorBoard scalar is logged at `step`, the number of optimizer steps taken so far (the trainer
    keeps it current): all tags share one x-axis, and a resumed run's purge of its predecessor's later
    events applies to every tag."""

    output_dir: Path
    resumed_at_step: int | None = None
    step: int = 0

    def __post_init__(self) -> None:
        # a resumed run drops the events its killed predecessor logged after the state it continues from
        self.writer = SummaryWriter(str(self.output_dir), purge_step=self.resumed_at_step) \
            if is_main_process() else None

    def scalar(self, name: str, value: float | None, step: int | None = None) -> None:
        """Log `value` at `step` (default: the current optimizer step)."""
        if self.writer is not None and value is not None:
            self.writer.add_scalar(name, value, self.step if step is None else step)

    def hparams(self, params: dict[str, object], metrics: dict[str, float | None]) -> None:
        """The run's settings and final metrics in TensorBoard's HPARAMS tab (numbers, text and flags only)."""
        if self.writer is None:
            return
        kept = {k: v if isinstance(v, (int, float, bool)) else str(v) for k, v in params.items()
                if v is None or isinstance(v, (int, float, bool, str, Path))}
        self.writer.add_hparams(kept, {f"hparams/{k}": v for k, v in metrics.items() if v is not None},
                                run_name=".", global_step=self.step)

    def json(self, name: str, payload: dict) -> None:
        if is_main_process():
            atomic_write_text(self.output_dir / name, json.dumps(payload, indent=2, default=str) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress(iterable: Iterable[T], **options: object) -> Iterable[T]:
    """A progress bar over `iterable`, drawn only by the main process and only when stderr is a terminal:
    a log file gets no cursor escapes."""
    return tqdm(iterable, disable=not (is_main_process() and sys.stderr.isatty()), **options)


PROJECT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what the platform module says)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def provenance() -> dict[str, object]:
    """What a rerun needs beyond the flags: the command, the project's git commit (and whether files differed
    from it) when MIRL runs from a git checkout, the versions of Python, torch, torchvision and numpy, and what
    the numbers depend on beyond them: the CPU (its model and the instruction set torch's kernels use), the
    number of threads, the GPU and its CUDA and cuDNN versions. Within one machine and these, `--deterministic`
    runs repeat bit for bit; across CPU kinds or thread counts floating-point sums run in another order."""
    record: dict[str, object] = {"command": [sys.executable, *sys.argv], "python": platform.python_version(),
                                 "torch": torch.__version__, "torchvision": torchvision.__version__,
                                 "numpy": np.__version__, "cpu": cpu_model(),
                                 "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                 "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                 "cuda": torch.version.cuda if torch.cuda.is_available() else None,
                                 "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                                 "git_commit": None, "git_uncommitted_changes": None}
    if (PROJECT / ".git").exists():
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=PROJECT, capture_output=True, text=True, timeout=30,
                                  check=True).stdout.strip()
        try:
            record["git_commit"] = git("rev-parse", "HEAD")
            record["git_uncommitted_changes"] = bool(git("status", "--porcelain", "--untracked-files=no"))
        except (OSError, subprocess.SubprocessError):  # no git program, or not a readable repository
            pass
    return record


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file of this process and rename: readers see the old or the new text.
    File names that are not valid UTF-8 (held by Python as surrogate escapes) are written back as the
    same bytes, so a list of image ids or files reads back exactly."""
    with writing(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")


def readable_text(text: str) -> str:
    """`text` as valid UTF-8 for a file a person reads: bytes of a file name that are not UTF-8 (which
    Python holds as surrogate escapes) are shown as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def csv_field(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n') else value
