"""The main job in one command, on sample data: write RSNA-format DICOMs, pretrain MoCo v2, then at
100 % and at a low fraction of the labels train the frozen linear probe, the fine-tuned network and the
supervised baseline, and print them side by side with one line saying what the numbers show.

`python -m mirl.demo` takes about 7 minutes on 2 idle CPU cores (far longer beside another job); every
stage is a run config handed to the same `pretrain` and `downstream` the RSNA_MoCo scripts call, and
everything lands in `--out` (default `mirl-demo/`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from mirl.config import DownstreamConfig, PretrainConfig
from mirl.datasets import RSNA
from mirl.downstream import downstream
from mirl.edge import guarded
from mirl.flags import image_size, non_negative_int, positive_int
from mirl.pretrain import pretrain
from mirl.sample_data import write_rsna
from mirl.study import TestPatients, compare_with_supervised, verdict_lines

RUNS = (("MoCo v2, frozen encoder + linear head", {"frozen": True}, "mocov2_frozen"),
        ("MoCo v2, fine-tuned", {}, "mocov2_finetune"),
        ("Supervised ResNet-18, random init", {"resnet": True}, "resnet"))


def test_metrics(out: Path, name: str, fraction: int) -> dict:
    return json.loads((out / "runs" / f"{name}_{fraction}F" / "metrics.json").read_text())["test"]


def cell(test: dict) -> str:
    low, high = test["ci95"]["auc_macro"] or (float("nan"), float("nan"))
    return f"{test['auc_macro']:.3f} [{low:.3f}, {high:.3f}]"


def results_table(out: Path, fractions: list[int]) -> str:
    """A Markdown table: a row per method, a column per label fraction, test macro AUC [95 % CI]."""
    lines = ["| RSNA sample data, test macro AUC [95 % CI] | " + " | ".join(f"{f} % of labels" for f in fractions)
             + " |", "|---" * (len(fractions) + 1) + "|"]
    for title, _, name in RUNS:
        lines.append(f"| {title} | " + " | ".join(cell(test_metrics(out, name, f)) for f in fractions) + " |")
    return "\n".join(lines)


def verdict(out: Path, fraction: int, patients: Callable[[str], str]) -> str:
    """One line: did the better pretrained run beat the supervised baseline at `fraction`, by a paired bootstrap
    over test patients (`patients` names each test image's) of the difference in test macro AUC?"""
    supervised = out / "runs" / f"resnet_{fraction}F"
    comparisons = [{"column": title, "fraction": fraction, "seed": 0,
                    **compare_with_supervised(out / "runs" / f"{name}_{fraction}F", supervised, RSNA, patients)}
                   for title, _, name in RUNS[:2]]
    return verdict_lines(comparisons, [fraction])[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mirl.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("mirl-demo"))
    parser.add_argument("--patients", type=positive_int, default=80)
    parser.add_argument("--image-size", type=image_size, default=64)
    parser.add_argument("--pretrain-epochs", type=positive_int, default=30)
    parser.add_argument("--downstream-epochs", type=positive_int, default=10,
                        help="at 100 %% of labels; a low fraction "
                        "trains the scripts' default, at least 200 optimizer steps")
    parser.add_argument("--fractions", type=int, nargs=2, default=[100, 10], metavar=("ALL", "LOW"))
    parser.add_argument("--workers", type=non_negative_int, default=2)
    args = parser.parse_args(argv)
    start = time.time()
    data, splits, runs = args.out / "data", args.out / "splits", args.out / "runs"
    if not (data / "stage_2_train.csv").is_file():
        print(f"[1/3] writing {args.patients} sample CT studies to {data}")
        write_rsna(data, patients=args.patients, size=128, workers=max(1, args.workers))
    # resume "auto": a demo started again continues where it stopped and retrains nothing it finished
    shared = dict(arch="resnet18", image_size=args.image_size, workers=args.workers, data_root=data, split_dir=splits,
                  resume="auto")
    print("[2/3] MoCo v2 pretraining")
    status = guarded(lambda: pretrain(RSNA, PretrainConfig(method="mocov2", output_dir=runs / "mocov2",
                                                           epochs=args.pretrain_epochs, batch_size=64, lr=0.1,
                                                           **shared)))
    if status:
        return status
    print("[3/3] downstream at each label fraction: frozen linear probe, fine-tuning, supervised baseline")
    plan = [(fraction, run) for fraction in args.fractions for run in RUNS]
    for number, (fraction, (title, mode, name)) in enumerate(plan, 1):
        print(f"run {number} of {len(plan)}: {title}, {fraction} % of labels")
        config = DownstreamConfig(method="mocov2", pretrained=runs / "mocov2" / "checkpoint.pth",
                                  fraction=fraction, output_dir=runs / f"{name}_{fraction}F", batch_size=32,
                                  epochs=args.downstream_epochs if fraction == 100 else None, **mode, **shared)
        status = guarded(lambda: downstream(RSNA, config))
        if status:
            return status
    table = results_table(args.out, args.fractions)
    summary = verdict(args.out, args.fractions[1], TestPatients(RSNA, data))
    (args.out / "results.md").write_text(f"{table}\n\n{summary}\n")
    print(f"\n{table}\n\n{summary}\n(sample data: 80 synthetic patients show the pipeline works end to end; "
          "real-data results are in the README)")
    print(f"done in {(time.time() - start) / 60:.1f} min; runs, TensorBoard logs and results.md in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
