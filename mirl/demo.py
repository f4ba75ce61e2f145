"""The main job in one command, on sample data: write RSNA-format DICOMs, pretrain MoCo v2, train the
frozen linear probe, the fine-tuned network and the supervised baseline, and print a results table.

`python -m mirl.demo` takes under 10 minutes on 2 CPU cores; every stage runs through the same entry
points as the RSNA_MoCo scripts, and everything lands in `--out` (default `mirl-demo/`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mirl.cli import downstream_script, pretrain_script
from mirl.sample_data import write_rsna

RUNS = (("MoCo v2, frozen encoder + linear head", ["--frozen"], "mocov2_frozen"),
        ("MoCo v2, fine-tuned", [], "mocov2_finetune"),
        ("Supervised ResNet-18, random init", ["--resnet"], "resnet"))


def results_table(out: Path, fraction: int) -> str:
    """A Markdown table of the test metrics of each downstream run."""
    lines = [f"| RSNA sample data, {fraction} % of labels | test macro AUC | test weighted log loss |",
             "|---|---|---|"]
    for title, _, name in RUNS:
        test = json.loads((out / "runs" / f"{name}_{fraction}F" / "metrics.json").read_text())["test"]
        lines.append(f"| {title} | {test['auc_macro']:.3f} | {test['weighted_log_loss']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mirl.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("mirl-demo"))
    parser.add_argument("--patients", type=int, default=80)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--downstream-epochs", type=int, default=10)
    parser.add_argument("--fraction", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.time()
    data, splits, runs = args.out / "data", args.out / "splits", args.out / "runs"
    if not (data / "stage_2_train.csv").is_file():
        print(f"[1/3] writing {args.patients} sample CT studies to {data}")
        write_rsna(data, patients=args.patients, size=128)
    # --resume auto: a demo started again continues where it stopped and retrains nothing it finished
    size = ["--arch", "resnet18", "--image-size", str(args.image_size), "--workers", str(args.workers),
            "--data-root", str(data), "--split-dir", str(splits), "--resume", "auto"]
    print("[2/3] MoCo v2 pretraining")
    status = pretrain_script("rsna", "mocov2", __file__, [
        *size, "--output-dir", str(runs / "mocov2"), "--epochs", str(args.pretrain_epochs), "--batch-size", "64",
        "--queue-size", "256", "--lr", "0.1"])
    if status:
        return status
    print("[3/3] downstream: frozen linear probe, fine-tuning, supervised baseline")
    for _, mode, name in RUNS:
        status = downstream_script("rsna", "mocov2", __file__, [
            *size, *mode, "--pretrained", str(runs / "mocov2" / "checkpoint.pth"), "--fraction", str(args.fraction),
            "--output-dir", str(runs / f"{name}_{args.fraction}F"), "--epochs", str(args.downstream_epochs),
            "--batch-size", "32"])
        if status:
            return status
    table = results_table(args.out, args.fraction)
    (args.out / "results.md").write_text(table + "\n")
    print(f"\n{table}\n\n(sample data: these numbers show the pipeline works, not how the methods compare)")
    print(f"done in {(time.time() - start) / 60:.1f} min; runs, TensorBoard logs and results.md in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
