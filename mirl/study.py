"""The label-efficiency study in one command.

`python -m mirl.study {rsna,isic,acdc} --data-root DIR --output-dir DIR` pretrains each method once,
trains every (method, mode, label fraction, seed) downstream run on the shared split files, and
writes `results.md` (one table per metric: a row per fraction, a column per method and mode, then a
verdict per fraction from a paired patient bootstrap against the supervised run), `results.csv` (a row
per run, every metric), `comparisons.csv` (each pretrained run against the supervised one) and
`label_efficiency.png` (metric against label fraction with 95 % intervals). Runs whose metrics exist are
skipped and pretrained checkpoints reused once their run identity is checked, so a stopped study
continues where it stopped and a study asked for other settings in the same folder is refused.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from scipy import stats

from mirl.checkpoints import CheckpointStore, newest_intact_state
from mirl.cli import bound_dataset
from mirl.codecs import codec_flag
from mirl.config import (
    AUGMENT_STYLES,
    SPATIAL_DIMS,
    DownstreamConfig,
    PretrainConfig,
    RunConfig,
    describe_differences,
    identity_differences,
)
from mirl.datasets import DATASETS, DatasetDescription
from mirl.downstream import PREDICTIONS_FILE, downstream, downstream_identity
from mirl.edge import StudyStopped, guarded
from mirl.errors import InputError
from mirl.flags import (
    DEFAULT_ARCH,
    OneLineParser,
    architecture_name,
    batch_size,
    image_size,
    non_negative_int,
    positive_float,
    positive_int,
    random_seed,
    volume_side,
)
from mirl.metrics import evaluate, paired_difference, primary_metric, reported_metrics
from mirl.models import METHODS
from mirl.pretrain import pretrain, pretraining_identity, settled_config
from mirl.spatial import settled_inputs
from mirl.splits import FRACTIONS, split_files_digest

SUPERVISED = "supervised"
# the control: the linear probe on a randomly initialised encoder, what a probe gets from no pretraining at all
RANDOM = "random"
UNPRETRAINED = (SUPERVISED, RANDOM)
MODES = ("frozen", "finetune")


@dataclass(frozen=True)
class Variant:
    """A family of the study's columns: the scripts' method it runs, with which encoder, and whether
    its pretraining uses labels (then once per label fraction, from that fraction's split only)."""

    method: str
    title: str
    arch: str | None = None  # None: the study's --arch
    label_aware: bool = False


VARIANTS: dict[str, Variant] = {
    **{name: Variant(name, spec.title) for name, spec in METHODS.items()},
    # the published MIRL table's extra columns: MoCo with an EfficientNet encoder, and label-aware MoCo
    "moco_efficient": Variant("moco", "MoCo EfficientNet-B0", arch="efficientnet_b0"),
    "moco_super": Variant("moco", "MoCo super", label_aware=True),
    "mocov2_super": Variant("mocov2", "MoCo v2 super", label_aware=True),
}


def pretraining_dir(out: Path, variant: str, fraction: int, seed: int | None = None) -> Path:
    """Where a variant's encoder is pretrained: one per variant, or per fraction when label-aware; with
    `seed` (`--pretrain-seeds`), one per seed too."""
    name = f"{variant}_{fraction}F" if VARIANTS[variant].label_aware else variant
    return out / "pretrain" / (name if seed is None else f"{name}_seed{seed}")


@dataclass(frozen=True)
class Run:
    """One downstream run of the study."""

    method: str  # a VARIANTS key, SUPERVISED or RANDOM
    mode: str
    fraction: int
    seed: int

    @property
    def column(self) -> str:
        if self.method == SUPERVISED:
            return "Supervised"
        if self.method == RANDOM:
            return "Random encoder frozen"
        return f"{VARIANTS[self.method].title} {self.mode}"

    @property
    def name(self) -> str:
        mode = "" if self.method == SUPERVISED else f"_{self.mode}"
        return f"{self.method}{mode}_{self.fraction}F_seed{self.seed}"


def plan(methods: list[str], modes: list[str], fractions: list[int], seeds: list[int]) -> list[Run]:
    runs = []
    for method in methods:
        for mode in {SUPERVISED: [SUPERVISED], RANDOM: ["frozen"]}.get(method, modes):
            runs += [Run(method, mode, f, s) for f in fractions for s in seeds]
    return runs


def metric_names(description: DatasetDescription) -> tuple[str, ...]:
    extra = ("patient_accuracy",) if description.patient_vote else ()
    return reported_metrics(description.multilabel) + extra


def result_rows(runs: list[Run], out: Path, dataset: str) -> list[dict]:
    rows = []
    for run in runs:
        metrics = json.loads((out / "runs" / run.name / "metrics.json").read_text())
        row = {"dataset": dataset, "method": run.method, "mode": run.mode, "fraction": run.fraction,
               "seed": run.seed, "column": run.column, "run_id": metrics.get("run_id"),
               "best_epoch": metrics["best_epoch"]}
        for split in ("test", "val"):
            for name, value in metrics[split].items():
                if isinstance(value, dict):
                    if name == "ci95":
                        for metric, interval in value.items():
                            row[f"{split}_{metric}_ci_low"], row[f"{split}_{metric}_ci_high"] = interval or (None, None)
                    else:
                        row.update({f"{split}_{name}_{k}": v for k, v in value.items()})
                else:
                    row[f"{split}_{name}"] = value
        rows.append(row)
    return rows


# the values each metric can take: an interval that reaches past them is clipped to them
METRIC_RANGES = {"auc_macro": (0.0, 1.0), "accuracy": (0.0, 1.0), "balanced_accuracy": (0.0, 1.0),
                 "patient_accuracy": (0.0, 1.0), "weighted_log_loss": (0.0, np.inf)}


def t_interval(values: np.ndarray, bounds: tuple[float, float] = (-np.inf, np.inf)) -> tuple[float, float]:
    """The 95 % confidence interval of the mean of `values` (two or more) by Student's t: with n seeds
    the half-width is t(0.975, n - 1) sd / sqrt(n), wider than 1.96 sd / sqrt(n) for small n; clipped to
    `bounds`, the values the metric can take (an AUC interval never reads [-0.49, 1.03])."""
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    low, high = np.clip([values.mean() - half, values.mean() + half], *bounds)
    return float(low), float(high)


def dataset_title(description: DatasetDescription) -> str:
    """How tables and plots name the data: RSNA, ISIC, ACDC, or the file of your own labels."""
    base, _, labels = description.name.partition(":")
    return f"{labels} (your labels)" if labels else base.upper()


def summarise(rows: list[dict], metric: str) -> dict[tuple[str, int], dict]:
    """Per (column, fraction): mean, sd and t-interval over seeds, and the mean bootstrap interval."""
    cells: dict[tuple[str, int], dict] = {}
    for key in {(r["column"], r["fraction"]) for r in rows}:
        mine = [r for r in rows if (r["column"], r["fraction"]) == key and r.get(f"test_{metric}") is not None]
        if not mine:
            continue
        values = np.array([r[f"test_{metric}"] for r in mine])
        lows = [r.get(f"test_{metric}_ci_low") for r in mine]
        highs = [r.get(f"test_{metric}_ci_high") for r in mine]
        interval = (float(np.mean(lows)), float(np.mean(highs))) if None not in lows + highs else None
        several = len(values) > 1
        cells[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if several else None,
                      "n": len(values), "ci": interval,
                      "seed_ci": t_interval(values, METRIC_RANGES.get(metric, (-np.inf, np.inf))) if several else None}
    return cells


def interval_note(rows: list[dict], pretrain_seeds: bool) -> str:
    """What the tables' and the figure's intervals are."""
    seeds = len({r["seed"] for r in rows})
    if seeds > 1:
        source = "each seed its own pretraining and downstream run" if pretrain_seeds else \
            "one pretraining per method; seeds vary the downstream runs only"
        return f"mean over {seeds} seeds [95 % t-interval over seeds] ({source})"
    return "one seed [95 % patient-bootstrap interval of the test set]"


def markdown_tables(rows: list[dict], description: DatasetDescription, columns: list[str],
                    fractions: list[int], pretrain_seeds: bool = False) -> str:
    """One table per metric: with several seeds the mean [t 95 % CI over seeds], with one seed the value
    [patient-bootstrap 95 % CI]; a line says which."""
    parts = [f"Cells: {interval_note(rows, pretrain_seeds)}."]
    for metric in metric_names(description):
        cells = summarise(rows, metric)
        lines = [f"### {dataset_title(description)}: test {metric.replace('_', ' ')}", "",
                 "| labels | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for fraction in fractions:
            entries = []
            for column in columns:
                cell = cells.get((column, fraction))
                if cell is None:
                    entries.append("n/a")
                elif cell["seed_ci"] is not None:
                    low, high = cell["seed_ci"]
                    entries.append(f"{cell['mean']:.3f} [{low:.3f}, {high:.3f}] (n={cell['n']})")
                elif cell["ci"] is not None:
                    entries.append(f"{cell['mean']:.3f} [{cell['ci'][0]:.3f}, {cell['ci'][1]:.3f}]")
                else:
                    entries.append(f"{cell['mean']:.3f}")
            lines.append(f"| {fraction} % | " + " | ".join(entries) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


METRIC_TITLES = {"auc_macro": "macro ROC AUC", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy",
                 "patient_accuracy": "patient accuracy", "weighted_log_loss": "weighted log loss"}


def plot(rows: list[dict], description: DatasetDescription, columns: list[str], fractions: list[int],
         path: Path, pretrain_seeds: bool = False) -> None:
    """The selection metric against label fraction (log x): per column and fraction the mean with its 95 %
    interval as an error bar (t over seeds when there are several, else the patient bootstrap), columns
    offset sideways so that none hides another, chance as a dashed line, the legend beside the axes and a
    caption saying what the bars are."""
    metric = primary_metric(description.multilabel)
    cells = summarise(rows, metric)
    figure = Figure(figsize=(8.5, 4.8))
    axis = figure.add_subplot()
    offsets = np.linspace(-0.05, 0.05, len(columns)) if len(columns) > 1 else [0.0]
    for column, offset in zip(columns, offsets):
        points = sorted((f, cells[column, f]) for f in fractions if (column, f) in cells)
        if not points:
            continue
        x = np.array([f for f, _ in points]) * 10 ** offset  # a sideways offset that looks equal on a log axis
        mean = np.array([c["mean"] for _, c in points])
        bounds = [c["seed_ci"] or c["ci"] or (c["mean"], c["mean"]) for _, c in points]
        error = np.array([[m - low for m, (low, _) in zip(mean, bounds)],
                          [high - m for m, (_, high) in zip(mean, bounds)]])
        axis.errorbar(x, mean, yerr=error, marker="o", markersize=4, capsize=3, linewidth=1.2, label=column)
    chance = 0.5 if description.multilabel else 1 / len(description.classes)
    axis.axhline(chance, linestyle="--", color="grey", linewidth=1,
                 label=f"chance ({chance:.2f}{'' if description.multilabel else f', 1 of {len(description.classes)}'})")
    axis.set_xscale("log")
    axis.xaxis.set_minor_locator(NullLocator())
    axis.set_xticks(fractions, [f"{f} %" for f in fractions])
    axis.set_xlabel("labelled training images (% of the training split)")
    title = METRIC_TITLES.get(metric, metric)
    axis.set_ylabel(f"test {title}")
    # two lines from the axes' left edge: a long title (your own labels' file name) is never cut off
    axis.set_title(f"{dataset_title(description)}: test {title} by label fraction\n(selected on val {title})",
                   loc="left")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.text(0.01, 0.01, f"Points and bars: {interval_note(rows, pretrain_seeds)}.", fontsize=7, ha="left",
                va="bottom")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=150)


class TestPatients:
    """Each labelled image's patient by image id, read once (an RSNA slice's from its header): what a paired
    bootstrap resamples."""

    def __init__(self, description: DatasetDescription, data_root: Path) -> None:
        self.description = description
        self.records = {r.image_id: r for r in description.find_labelled(data_root)}
        self.known: dict[str, str] = {}

    def __call__(self, image_id: str) -> str:
        if image_id not in self.known:
            self.known[image_id] = self.description.patient_group(self.records[image_id]) or image_id
        return self.known[image_id]


def compare_with_supervised(pretrained: Path, supervised: Path, description: DatasetDescription,
                            patients: Callable[[str], str]) -> dict:
    """Two downstream runs' test predictions (`pretrained` and `supervised` output dirs) on the test images both
    could read: the selection metric of each, their difference, and its 95 % paired bootstrap interval over
    whole test patients (both runs scored on the same resampled patients each time)."""
    metric = primary_metric(description.multilabel)

    def score(truth: np.ndarray, probability: np.ndarray) -> float | None:
        return evaluate(truth, probability, description.classes, description.multilabel)[metric]
    ours, theirs = (np.load(folder / PREDICTIONS_FILE) for folder in (pretrained, supervised))
    common = sorted(set(ours["image_ids"]) & set(theirs["image_ids"]))
    a, b = ([rows[image_id] for image_id in common]
            for rows in ({image_id: i for i, image_id in enumerate(p["image_ids"])} for p in (ours, theirs)))
    truth, groups = ours["truth"][a], [patients(image_id) for image_id in common]
    difference, interval = paired_difference(truth, ours["probability"][a], theirs["probability"][b], groups, score)
    return {"metric": metric, "pretrained": score(truth, ours["probability"][a]),
            "supervised": score(truth, theirs["probability"][b]), "difference": difference,
            "ci_low": interval[0] if interval else None, "ci_high": interval[1] if interval else None,
            "test_images": len(common), "test_patients": len(set(groups))}


def paired_comparisons(runs: list[Run], out: Path, description: DatasetDescription, data_root: Path) -> list[dict]:
    """Each pretrained run against the supervised run of its fraction and seed (`compare_with_supervised`)."""
    supervised = {(r.fraction, r.seed): r for r in runs if r.method == SUPERVISED}
    pretrained = [r for r in runs if r.method not in UNPRETRAINED and (r.fraction, r.seed) in supervised]
    if not pretrained:
        return []
    patients = TestPatients(description, data_root)
    return [{"column": run.column, "fraction": run.fraction, "seed": run.seed,
             **compare_with_supervised(out / "runs" / run.name, out / "runs" / supervised[run.fraction, run.seed].name,
                                       description, patients)} for run in pretrained]


MIN_VERDICT_PATIENTS = 10  # below this many test patients the resamples repeat a few patients: no verdict


def verdict_lines(comparisons: list[dict], fractions: list[int]) -> list[str]:
    """Per label fraction, one line: did the best pretrained column beat supervised training, by a paired
    interval that excludes no difference (first seed's runs)?"""
    lines = []
    for fraction in fractions:
        mine = [c for c in comparisons if c["fraction"] == fraction and c["difference"] is not None]
        if not mine:
            continue
        seed = min(c["seed"] for c in mine)
        best = max((c for c in mine if c["seed"] == seed), key=lambda c: c["difference"])
        metric = METRIC_TITLES.get(best["metric"], best["metric"])
        if best["ci_low"] is None:
            found, interval = "no interval (too few test patients of some class)", ""
        elif best["test_patients"] < MIN_VERDICT_PATIENTS:  # a bootstrap of a handful of patients is no test
            found, interval = f"too few test patients ({best['test_patients']}) to tell", ""
        else:
            found = ("pretraining helped" if best["ci_low"] > 0 else
                     "pretraining did worse than supervised training" if best["ci_high"] < 0 else
                     "no clear difference")
            interval = f" [95 % paired bootstrap over {best['test_patients']} test patients: " \
                       f"{best['ci_low']:+.3f}, {best['ci_high']:+.3f}]"
        lines.append(f"At {fraction} % of labels (seed {seed}): {found}. Best pretrained, {best['column']}: "
                     f"{best['pretrained']:.3f} test {metric} against supervised {best['supervised']:.3f}, "
                     f"difference {best['difference']:+.3f}{interval}.")
    return lines


def write_csv(path: Path, rows: list[dict]) -> None:
    """`rows` as a CSV file, a column for every key any row has, in the order they first appear."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)


def recorded_pretraining(folder: Path) -> tuple[dict | None, int]:
    """The run identity a pretraining folder's newest intact state records, and the epochs it finished (None,
    0 when nothing was trained there); a damaged newest state is passed over for the one before, as a
    resumed run does."""
    _, state = newest_intact_state(CheckpointStore(folder, keep=1, publish=True))
    if state is None:
        return None, 0
    identity = state.get("run") if isinstance(state, dict) else None
    return (identity if isinstance(identity, dict) else {}), int(state.get("epoch", 0))


def recorded_run(folder: Path) -> dict:
    """The run identity a finished downstream run's metrics.json records ({} from an older MIRL)."""
    try:
        identity = json.loads((folder / "metrics.json").read_text()).get("identity")
    except (OSError, ValueError, AttributeError) as error:
        raise InputError(f"{folder / 'metrics.json'} cannot be read ({type(error).__name__}); remove {folder} to "
                         "run it again") from None
    return identity if isinstance(identity, dict) else {}


def refuse_other_settings(folder: Path, recorded: dict, expected: dict) -> None:
    """Stop the study in one line when a run it would reuse was made with other settings: its numbers would
    be published beside this study's under one column."""
    differing = identity_differences(recorded, expected)
    if differing:
        raise InputError(f"{folder} was made with other settings than this study asks for "
                         f"({describe_differences(recorded, expected, differing)}); use another --output-dir, or the "
                         "settings it was made with")


def refuse_repeats(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A value given twice in a list flag would count one run twice (`--seeds 0 0`: n=2, a zero-width interval)."""
    for name in ("fractions", "methods", "modes", "seeds"):
        values = getattr(args, name)
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            parser.error(f"--{name}: {', '.join(repeated)} given more than once")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m mirl.study", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--split-dir", type=Path, default=None, help="default: OUTPUT_DIR/splits")
    parser.add_argument("--fractions", type=int, nargs="+", choices=FRACTIONS, default=list(FRACTIONS))
    parser.add_argument("--methods", nargs="+", choices=[*VARIANTS, *UNPRETRAINED], default=[*METHODS, *UNPRETRAINED],
                        help="columns to run (default: every method, the supervised baseline and the random-encoder "
                             "probe; moco_efficient, moco_super and mocov2_super add the published table's others)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seeds", type=random_seed, nargs="+", default=[0])
    parser.add_argument("--pretrain-seeds", action="store_true",
                        help="pretrain once per seed too, so the intervals over seeds include pretraining's "
                             "variance (default: one pretraining per method, seeded by the first seed)")
    parser.add_argument("--arch", type=architecture_name, default=None,
                        help="resnet18, resnet50, efficientnet_b0..b3, or a timm model as timm:NAME; with --dims 3 "
                             "resnet18_3d, resnet34_3d, resnet50_3d (default resnet50, resnet50_3d)")
    parser.add_argument("--image-size", type=image_size, default=224)
    parser.add_argument("--dims", type=int, choices=SPATIAL_DIMS, default=2,
                        help="2: images; 3: volumes, as the scripts' --dims (README, Volumes)")
    parser.add_argument("--volume-size", type=volume_side, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="--dims 3: the input in voxels (default: the dataset's)")
    parser.add_argument("--voxel-size", type=positive_float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="--dims 3: voxel size in mm (default: the dataset's)")
    parser.add_argument("--epochs", type=positive_int, default=None, help="pretraining epochs (method default)")
    parser.add_argument("--downstream-epochs", type=positive_int, default=None, help="default: the scripts'")
    parser.add_argument("--batch-size", type=batch_size, default=256, help="pretraining batch")
    parser.add_argument("--downstream-batch-size", type=batch_size, default=None, help="default: --batch-size")
    parser.add_argument("--workers", type=non_negative_int, default=None)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--augment", choices=AUGMENT_STYLES, default=None,
                        help="the pretraining views' recipe family (default: the dataset's, as the scripts')")
    parser.add_argument("--queue-size", type=positive_int, default=None,
                        help="MoCo queue (default: the scripts' rule, a power of two <= images / 4)")
    parser.add_argument("--cache", type=Path, default=None, help="decoded-image cache folder shared by all runs")
    parser.add_argument("--codec", type=codec_flag, default="raw",
                        help="how --cache stores the images: raw, or a compressed, sharded store (jpeg:95, zstd, ...)")
    parser.add_argument("--keep-states", action="store_true",
                        help="keep each finished run's training states (default: removed once it has published)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="your own labels: a CSV with an image column and one 0/1 column per class")
    parser.add_argument("--group-column", default=None, metavar="NAME",
                        help="with --labels: the column naming each image's patient (splits keep patients together)")
    args = parser.parse_args(argv)
    refuse_repeats(parser, args)
    return guarded(lambda: run_study(args))


def run_study(args: argparse.Namespace) -> None:
    """Pretrain, run the grid of downstream runs, and write the tables and the plot; a failing run stops
    the study with its exit status."""
    # the labels are read once here, so a bad CSV stops the study with one line before any training
    shared = dict(data_root=args.data_root, split_dir=args.split_dir or args.output_dir / "splits",
                  image_size=args.image_size, device=args.device, cache=args.cache, codec=args.codec,
                  labels=args.labels, group_column=args.group_column, resume="auto", keep_states=args.keep_states,
                  dims=args.dims, volume_size=args.volume_size, voxel_size=args.voxel_size,
                  **({"workers": args.workers} if args.workers is not None else {}))
    description = bound_dataset(args.dataset, RunConfig(output_dir=args.output_dir, **shared))
    # a volume study's grid settled once, so every run (and a run reused) records the same one
    settled = settled_inputs(RunConfig(output_dir=args.output_dir, **shared), description)
    shared.update(volume_size=settled.volume_size, voxel_size=settled.voxel_size)
    args.arch = args.arch or DEFAULT_ARCH[args.dims]
    out = args.output_dir

    def run_or_stop(train: Callable[[], None]) -> None:
        status = guarded(train)
        if status:
            raise StudyStopped(status)

    def pretrained_seed(seed: int) -> int | None:
        return seed if args.pretrain_seeds else None

    def pretraining_key(run: Run) -> tuple[str, int | None, int | None]:
        """Which pretraining a run starts from: its variant's, per fraction when label-aware, per seed with
        --pretrain-seeds."""
        return run.method, run.fraction if VARIANTS[run.method].label_aware else None, pretrained_seed(run.seed)

    runs = plan(args.methods, args.modes, args.fractions, args.seeds)
    pretraining_configs = {}  # pretraining_key: its config
    for run in runs:
        if run.method in UNPRETRAINED:
            continue
        key = pretraining_key(run)
        if key not in pretraining_configs:
            variant, seed = VARIANTS[run.method], key[2]
            spec = METHODS[variant.method]
            queue = {"queue_size": args.queue_size} \
                if args.queue_size and "queue_size" in spec.option_defaults() else {}
            pretraining_configs[key] = PretrainConfig(
                method=variant.method, output_dir=pretraining_dir(out, run.method, run.fraction, seed),
                batch_size=args.batch_size, arch=variant.arch or args.arch, epochs=args.epochs,
                seed=args.seeds[0] if seed is None else seed, supervised=variant.label_aware,
                fraction=key[1] or 100, augment=args.augment, options=queue, **shared)

    def downstream_config(run: Run) -> DownstreamConfig:
        if run.method in UNPRETRAINED:  # a torchvision network from random weights
            method, encoder = "moco", {"arch": args.arch, "resnet": True}
        else:
            variant = VARIANTS[run.method]
            method = variant.method
            encoder = {"arch": variant.arch or args.arch, "pretrained": pretraining_dir(
                out, run.method, run.fraction, pretrained_seed(run.seed)) / "checkpoint.pth"}
        return DownstreamConfig(method=method, output_dir=out / "runs" / run.name, epochs=args.downstream_epochs,
                                batch_size=args.downstream_batch_size or args.batch_size,
                                frozen=run.mode == "frozen", fraction=run.fraction, seed=run.seed, **encoder, **shared)

    # only what an unfinished run needs: a study continued after its last run of a method pretrains nothing more
    unfinished = [r for r in runs if not (out / "runs" / r.name / "metrics.json").is_file()]
    needed = {pretraining_key(r) for r in unfinished if r.method not in UNPRETRAINED}
    # Before any training: every run and pretraining this study would reuse must be the one it asks for (with
    # the splits' contents once the split files exist: before, no run can have used them)
    splits = split_files_digest(shared["split_dir"])
    known = {"splits": splits} if splits is not None else {}
    for run in runs:
        if run not in unfinished:
            run_dir = out / "runs" / run.name
            refuse_other_settings(run_dir, recorded_run(run_dir),
                                  {**downstream_identity(description, downstream_config(run)), **known})
    trained = set()  # pretrainings already trained to their epochs
    for key in needed:
        config = pretraining_configs[key]
        spec = METHODS[config.method]
        recorded, epochs = recorded_pretraining(config.output_dir)
        if recorded is None:
            continue
        expected = {**pretraining_identity(description, settled_config(spec, config, None, description)), **known}
        refuse_other_settings(config.output_dir, recorded,
                              {k: v for k, v in expected.items() if k not in spec.settled_options or v is not None})
        if epochs >= config.epochs:
            trained.add(key)

    for key, config in pretraining_configs.items():
        if key in trained:
            print(f"reusing {config.output_dir / 'checkpoint.pth'}")
        elif key in needed:
            run_or_stop(lambda: pretrain(description, config))

    for number, run in enumerate(runs, 1):
        run_dir = out / "runs" / run.name
        if (run_dir / "metrics.json").is_file():
            print(f"[{number}/{len(runs)}] {run.name}: done before, skipped")
            continue
        print(f"[{number}/{len(runs)}] {run.name}")
        config = downstream_config(run)
        run_or_stop(lambda: downstream(description, config))

    rows = result_rows(runs, out, description.name)
    columns = list(dict.fromkeys(r.column for r in runs))
    fractions = sorted(set(args.fractions), reverse=True)
    write_csv(out / "results.csv", rows)
    tables = markdown_tables(rows, description, columns, fractions, args.pretrain_seeds)
    comparisons = paired_comparisons(runs, out, description, args.data_root)
    if comparisons:
        write_csv(out / "comparisons.csv", comparisons)
    verdicts = verdict_lines(comparisons, fractions) or \
        ["No verdict: add `supervised` to --methods to compare pretraining with supervised training."]
    tables += "\n### Did pretraining help?\n\n" + "\n".join(f"- {line}" for line in verdicts) + "\n"
    (out / "results.md").write_text(tables)
    plot(rows, description, columns, sorted(fractions), out / "label_efficiency.png", args.pretrain_seeds)
    print(f"\n{tables}\nwrote {out / 'results.md'}, {out / 'results.csv'} and {out / 'label_efficiency.png'}")


if __name__ == "__main__":
    sys.exit(main())
