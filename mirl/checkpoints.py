"""Checkpoints a run can be trusted with.

Every file is written atomically (a temporary file, flushed to disk, then renamed), so a kill at any
moment leaves the previous checkpoint whole. Files are read back with torch's weights-only unpickler,
so a checkpoint that carries pickled code is refused and the code never runs. A training state holds
everything an exact continuation needs: weights, optimizer, schedule, gradient scaler, the position
inside the epoch and every random generator of every rank.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import sys
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mirl.config import CHECKPOINT_NAME, describe_differences, identity_differences
from mirl.distributed import is_main_process
from mirl.errors import CheckpointError, InputError, OutputError

STATES_FOLDER = "checkpoints"
_STATE_NAME = re.compile(r"state-e(\d{4,})-b(\d{6,})\.pth")


FINISHED_FILES = (CHECKPOINT_NAME, "metrics.json")  # what a finished run leaves in its output dir


@contextmanager
def writing(path: Path) -> Iterator[Path]:
    """A temporary file of this process beside `path`, renamed onto it when the block ends. A failed
    write (a full disk, a folder gone read-only) removes the temporary file, so it cannot keep the disk
    full, and becomes one OutputError naming the file; the previous `path` stays whole."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path} ({error.strerror or type(error).__name__}); what was written "
                          "before is intact") from None


def save_checkpoint(payload: dict, path: Path) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written checkpoint."""
    if not is_main_process():
        return
    with writing(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(payload, f)
        except RuntimeError as error:
            # torch's zip writer reports a failed write (a full disk, a quota) as a RuntimeError ("unexpected
            # pos"), which would escape `writing` and leave the partial file filling the disk
            full = shutil.disk_usage(tmp.parent).free < 2 ** 20
            raise OSError(errno.ENOSPC if full else errno.EIO,
                          "no space left on the device" if full else f"torch.save failed: {str(error)[:120]}"
                          ) from None
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: Path) -> dict:
    """Load with torch's weights-only unpickler: a file carrying pickled code is refused, never run."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a crafted file
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a loadable MIRL checkpoint ({reason[:200]})") from None


def random_state() -> dict:
    """This process's python, numpy, torch and CUDA generators, in types the weights-only loader accepts."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_random_state(state: dict) -> None:
    """Put every generator back where `random_state` found it."""
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_position(path: Path) -> tuple[int, int]:
    """(epoch, batches of that epoch already trained) of a training-state file, from its name."""
    match = _STATE_NAME.fullmatch(path.name)
    if match is None:
        raise ValueError(f"{path.name} is not a training-state file name")
    return int(match.group(1)), int(match.group(2))


class CheckpointStore:
    """The training states of one run, `OUTPUT/checkpoints/state-eEEEE-bBBBBBB.pth`, of which the
    newest `keep` survive. Names sort in training order: epoch E (from 0) after B of its batches;
    an epoch's end is the next epoch at batch 0.

    With `publish`, `OUTPUT/checkpoint.pth` is the newest state too (a hard link, no second copy):
    that is the file a pretraining run hands to the downstream scripts.
    """

    def __init__(self, output_dir: Path, keep: int, publish: bool) -> None:
        self.output_dir = output_dir
        self.folder = output_dir / STATES_FOLDER
        self.keep = keep
        self.publish = publish

    def states(self) -> list[Path]:
        """Complete state files, oldest first (temporary files of an interrupted write are not states)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _STATE_NAME.fullmatch(p.name))

    def newest(self) -> Path | None:
        states = self.states()
        return states[-1] if states else None

    def save(self, payload: dict, epoch: int, batch: int) -> Path:
        """Write one state atomically, publish it, then drop the oldest beyond `keep`."""
        path = self.folder / f"state-e{epoch:04d}-b{batch:06d}.pth"
        if not is_main_process():
            return path
        self.folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(payload, path)
        if self.publish:
            self._publish(path)
        for old in self.states()[:-self.keep]:
            old.unlink()
        return path

    def _publish(self, state: Path) -> None:
        with writing(self.output_dir / CHECKPOINT_NAME) as tmp:
            tmp.unlink(missing_ok=True)
            try:
                os.link(state, tmp)
            except OSError:  # a file system without hard links: copy instead
                shutil.copyfile(state, tmp)

    def remove_states(self) -> None:
        """Delete the training states of a run that has published its result (`--keep-states` keeps them): a
        pretraining run's checkpoint.pth is a hard link of the newest and survives it."""
        if is_main_process():
            shutil.rmtree(self.folder, ignore_errors=True)

    def remove_leftovers(self) -> None:
        """Delete the temporary files of writes that a kill or a full disk interrupted: they are never states,
        and they hold the room the next save needs. Only the run holding the output dir's lock calls this."""
        if not is_main_process():
            return
        for folder in (self.output_dir, self.folder):
            if folder.is_dir():
                for leftover in folder.glob("*.tmp"):
                    leftover.unlink(missing_ok=True)

    def check_room(self, state_bytes: int) -> None:
        """Refuse, before training, a disk without room for the states this run keeps (and the one being
        written while the oldest still exists), rather than fail at the first save after hours of work."""
        needed = (self.keep + 1) * state_bytes
        existing = next(p for p in (self.output_dir, *self.output_dir.parents) if p.exists())  # made at first save
        free = shutil.disk_usage(existing).free
        if free < needed:
            raise OutputError(f"{self.output_dir} has {free / 2 ** 20:,.0f} MiB free, and this run's training "
                              f"states need about {needed / 2 ** 20:,.0f} MiB ({self.keep + 1} of "
                              f"{state_bytes / 2 ** 20:,.0f} MiB); free some space or lower --keep")


def resume_state(requested: str | None, store: CheckpointStore) -> tuple[Path | None, dict | None]:
    """The state a run continues from and its contents: `--resume PATH`, or with `--resume auto` the newest
    intact state in the output dir (a damaged newest one is passed over with a warning), or a pretraining
    run's published checkpoint.pth when its states were deleted; (None, None) when there is nothing to
    continue, so a job script can always pass `--resume auto`.

    Nothing a user trained is ever lost: without `--resume`, an output dir holding states or a finished
    run's files is refused rather than overwritten, and so is `--resume auto` over a finished run whose
    states are gone."""
    finished = [name for name in FINISHED_FILES if (store.output_dir / name).is_file()]
    if requested is None:
        newest = store.newest()
        if newest is not None or finished:
            held = (f"training states (newest {newest.name})" if newest is not None
                    else f"a finished run ({finished[0]})")
            raise InputError(f"{store.output_dir} already holds {held}; continue it with --resume auto, or choose "
                             "another --output-dir")
        return None, None
    if requested != "auto":
        path = Path(requested)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such checkpoint")
        return path, load_checkpoint(path)
    if not store.states() and not store.publish and finished:
        raise InputError(f"{store.output_dir} holds a finished run ({finished[0]}) and no training state to "
                         "continue; choose another --output-dir")
    return newest_intact_state(store)


def newest_intact_state(store: CheckpointStore) -> tuple[Path | None, dict | None]:
    """The newest training state that loads, and its contents: a damaged newest one is passed over with a
    warning for the one before it; a pretraining run's published checkpoint.pth stands in when its states
    were deleted (or none of them loads). (None, None) when there is none; a CheckpointError when none loads."""
    candidates = list(reversed(store.states()))
    published = store.output_dir / CHECKPOINT_NAME
    if store.publish and published.is_file() and not any(published.samefile(path) for path in candidates):
        candidates.append(published)  # the newest state when the states were removed, or all of them are damaged
    for position, path in enumerate(candidates):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            if position == len(candidates) - 1:
                raise
            print(f"warning: {error}; trying the older {candidates[position + 1].name}", file=sys.stderr)
    return None, None


@contextmanager
def reading_state(source: Path) -> Iterator[None]:
    """Whatever loading a damaged or foreign training state raises (a missing key, a tensor of another
    shape, a value of another type) becomes one CheckpointError naming the file."""
    try:
        yield
    except (KeyError, RuntimeError, TypeError, ValueError, AttributeError, IndexError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{source} is not a complete training state of this kind of run "
                              f"({type(error).__name__}: {reason[:200]})") from None


def check_same_run(checkpoint: dict, identity: dict[str, object], source: Path) -> None:
    """Refuse to continue a state written by another run (another seed, temperature, augmentation, encoder,
    data...): it would load wrong weights, or silently train a mixture of two runs under one name."""
    saved = checkpoint.get("run") if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{source} is not a MIRL training state; --resume takes a file from "
                              f"{STATES_FOLDER}/ or a pretraining checkpoint.pth")
    differing = identity_differences(saved, identity)
    if differing:
        raise CheckpointError(f"{source} belongs to another run ({describe_differences(saved, identity, differing)}); "
                              "resume with the settings it was started with, or choose another --output-dir")


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes: an encoder's identity in the run that starts from it. Remembered per
    file version (its size, modification time and inode), so a study that checks fifty finished runs of one
    pretraining reads its checkpoint once."""
    stat = path.stat()
    return _digest_of_version(path.resolve(), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@lru_cache(maxsize=64)
def _digest_of_version(path: Path, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2 ** 22):
            digest.update(chunk)
    return digest.hexdigest()
