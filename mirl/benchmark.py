"""How fast pretraining runs on this device, and how much of that the input pipeline keeps.

    python -m mirl.benchmark --method mocov2 --arch resnet50 --image-size 112 --batch-size 32 --steps 20 \
        --json bench.json

Measured after warm-up, in images per second (image pairs per second for the contrastive methods):

- `model_only_per_s`: training steps on views already on the device: the ceiling.
- `pipeline_per_s`: MIRL's real path: decoded-image cache, DataLoader, augmentation of whole batches on
  the device, mixed precision, channels_last, fused momentum update.
- `efficiency`: pipeline / model-only, the share of the ceiling the input pipeline keeps.
- `baseline_per_s`: the papers' recipe on the same model: fp32, per-sample PIL augmentation in
  DataLoader workers, a Python loop over parameters for the momentum update, every file decoded every
  time it is read. `speedup_vs_baseline` = pipeline / baseline.
- `decode_per_s` (one core decoding DICOM, converting to HU, windowing and resizing) and
  `cache_read_per_s` (one core reading the same images from the cache).
- `peak_memory_mb`: the device's peak allocation on CUDA, the process's peak resident memory on the CPU.
- `gflop_per_item` (one training step's matrix products and convolutions, forward and backward, counted by
  torch's flop counter, per image pair), `matmul_tflop_per_s` (a large matrix product in the run's precision,
  timed on the same device) and `mfu` = pipeline rate x FLOPs per item / that rate (`model_only_mfu` alike).
- `operator_calls_per_step`: ATen operator calls of one model-only step, from torch.profiler.

Without `--data-root`, it writes RSNA-format sample DICOMs at the real 512-pixel size into a temporary
folder. No timing here is a test: targets are checked by reading the JSON.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from mirl.augment import IMAGENET_MEAN, IMAGENET_STD, REFERENCE_SIZE, AugmentRecipe, view_recipe
from mirl.cache import DecodedImageCache, dataset_images, open_cache
from mirl.codecs import codec_flag
from mirl.config import SPATIAL_DIMS, RunConfig
from mirl.datasets import DATASETS, DatasetDescription, ImageRecord, decode_record
from mirl.edge import guarded
from mirl.encoders import architecture
from mirl.flags import (
    OneLineParser,
    batch_size,
    image_size,
    non_negative_int,
    positive_float,
    positive_int,
    volume_side,
)
from mirl.loaders import make_loader
from mirl.method_spec import TrainingPlan, View
from mirl.methods import METHODS
from mirl.pretrain import build_optimizer, training_recipe
from mirl.pretraining_method import PretrainingMethod
from mirl.runtime import precision_name, prepare_network, resolve_device, resolve_precision
from mirl.sample_data import write_rsna
from mirl.shards import ShardedImageStore
from mirl.spatial import InputSpace, input_space, settled_inputs
from mirl.teacher import momentum_teachers
from mirl.training import TrainingStep


def pil_views(recipe: AugmentRecipe, size: int) -> T.Compose:
    """The papers' per-sample PIL augmentation with torchvision's classic transforms, same ranges."""
    sigma = tuple(s * size / REFERENCE_SIZE for s in recipe.blur_sigma)
    colour = [T.RandomApply([T.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)],
                            p=recipe.jitter_p),
              T.RandomGrayscale(recipe.grayscale_p)]
    return T.Compose([
        T.RandomResizedCrop(size, scale=recipe.crop_scale, ratio=recipe.crop_ratio),
        *(reversed(colour) if recipe.grayscale_first else colour),
        T.RandomApply([T.GaussianBlur(2 * math.ceil(3 * sigma[1]) + 1, sigma)], p=recipe.blur_p),
        T.RandomSolarize(128, p=recipe.solarize_p),
        T.RandomHorizontalFlip(recipe.flip_p),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class DecodeAndAugmentEveryTime(Dataset):
    """The reference data path: decode the file, then augment each view on the CPU, at every read."""

    def __init__(self, records: list[ImageRecord], views: list[T.Compose]) -> None:
        self.records, self.views = records, views

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        image = Image.fromarray(decode_record(self.records[index]))
        return [view(image) for view in self.views]


def timed_rates(runners: dict[str, Callable[[], int]], warmup: int, steps: int, device: torch.device,
                block: int = 5) -> dict[str, float]:
    """Items per second of each runner (each call returns its item count) over `steps` calls, after
    `warmup` calls each. Runners take turns in blocks of `block` calls, so a slow drift of the machine
    (a noisy neighbour, the clock) weighs on all of them alike instead of on whichever runs last."""
    for run_one in runners.values():
        for _ in range(warmup):
            run_one()
    seconds, items = dict.fromkeys(runners, 0.0), dict.fromkeys(runners, 0)
    for start in range(0, steps, block):
        for name, run_one in runners.items():
            synchronize(device)
            began = time.perf_counter()
            for _ in range(min(block, steps - start)):
                items[name] += run_one()
            synchronize(device)
            seconds[name] += time.perf_counter() - began
    return {name: items[name] / seconds[name] for name in runners}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pretraining_model(method: str, arch: str, reference: bool, total_steps: int = 10 ** 6) -> PretrainingMethod:
    """The method's network with its default options and, for the queue methods, the paper's K; for the
    papers' code path, its momentum teachers updated one parameter at a time, as the reference code does."""
    spec = METHODS[method]
    model = spec.build(arch, spec.options(spec.paper_options), TrainingPlan(total_steps, steps_per_epoch=1000))
    for teacher in momentum_teachers(model):
        teacher.per_parameter = reference
    return model


def method_views(method: str, arch: str, image_size: int) -> tuple[View, ...]:
    """The views the method trains on at `image_size`, with its default options."""
    spec = METHODS[method]
    return spec.views(spec.options(spec.paper_options), image_size, architecture(arch).transformer)


def contrastive_step(model: PretrainingMethod, method: str, arch: str, batch_size: int, device: torch.device,
                     precision: torch.dtype | None, views: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
                     ) -> TrainingStep:
    """One training step of the method's optimizer at its paper learning rate for `batch_size`, with its hooks."""
    recipe = training_recipe(METHODS[method], arch)
    optimizer = build_optimizer(model, recipe.optimizer, recipe.lr_per_256 * batch_size / 256, recipe.weight_decay)
    return TrainingStep(lambda images, _: model(*views(images))[0], optimizer, None, device, precision, hooks=model)


def step_flops(run_one: Callable[[], int]) -> float:
    """Floating-point operations of one call (matrix products and convolutions, forward and backward), as
    torch's flop counter counts them."""
    with FlopCounterMode(display=False) as counter:
        run_one()
    return float(counter.get_total_flops())


def matmul_flops_per_s(device: torch.device, precision: torch.dtype | None) -> float:
    """The device's measured dense matrix-product rate in the run's precision: the denominator of MFU
    (model FLOPs utilisation), measured rather than read off a datasheet."""
    side = 8192 if device.type == "cuda" else 2048
    dtype = precision or torch.float32
    a, b = torch.randn(side, side, device=device, dtype=dtype), torch.randn(side, side, device=device, dtype=dtype)
    repeats = 20 if device.type == "cuda" else 3
    seconds = timed_rates({"matmul": lambda: (a @ b, 1)[1]}, 2, repeats, device, block=repeats)["matmul"]
    return 2 * side ** 3 * seconds


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """The process's stderr (file descriptor 2) sent to /dev/null for the block: the profiler's C++ library
    logs its start and stop, and on a machine without a GPU an `ERROR: gpuGetDeviceCount failed` that is
    none, straight to the descriptor, past Python."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def operator_calls_per_step(run_one: Callable[[], int], steps: int = 3) -> float:
    """ATen operator calls (nested calls included) per call of `run_one`, as torch.profiler records them on
    the CPU: on a GPU each is a kernel launch or host work between them, the overhead that large-batch
    throughput hides and small models expose."""
    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            run_one()
    return sum(event.count for event in profiler.key_averages() if event.key.startswith("aten::")) / steps


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor())
    return f"{model} ({torch.get_num_threads()} threads)"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_benchmark(args: argparse.Namespace, data_root: Path, cache_root: Path) -> dict:
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    description = DATASETS[args.dataset].in_dims(args.dims)
    data_root = data_root.resolve()  # as the cache names its images
    records = dataset_images(description, data_root)
    inputs = benchmark_inputs(args, description, data_root)
    views = method_views(args.method, args.arch, args.image_size)
    # 2-D: the papers' recipes, as the reference path augments; volumes: the modality's (there is no reference)
    augments = [inputs.training_view(view, "paper" if args.dims == 2 else description.augment) for view in views]
    torch.manual_seed(0)

    decoded = inputs.dataset(records, 0)
    picks = iter(np.random.default_rng(0).integers(len(records), size=10 ** 6))

    def decode_one() -> int:
        decoded[int(next(picks))]
        return 1
    decode_per_s = timed_rates({"decode": decode_one}, 2, min(len(records), 200), torch.device("cpu"))["decode"]
    cache = open_cache(description, data_root, inputs, cache_root, args.workers, args.codec)

    def read_one() -> int:
        cache.read(int(next(picks)))
        return 1
    cache_read_per_s = timed_rates({"read": read_one}, 2, 2000, torch.device("cpu"))["read"]
    store = store_figures(cache, decoded, records)
    if args.store_only:
        return {**store, "cache_read_per_s": cache_read_per_s, "decode_per_s": decode_per_s, "images": len(records),
                "unit": "items", "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}

    # the ceiling (steps on views already on the device) and the real path (cache, loader, augmentation
    # on the device) on the same model, measured in alternating blocks
    model = prepare_network(pretraining_model(args.method, args.arch, reference=False), device, True, args.compile,
                            inputs.spatial_dims)
    model.train()
    sample = inputs.dataset(records[:args.batch_size], 0, cache)
    first = torch.stack([sample[i][0] for i in range(len(sample))]).to(device)
    fixed_views = tuple(augment(first).contiguous() for augment in augments)
    model_step = contrastive_step(model, args.method, args.arch, args.batch_size, device, precision,
                                  lambda _: fixed_views)
    # on a GPU a JPEG store hands batches over encoded and they decode there (nvJPEG), as in a run
    loader = make_loader(inputs.dataset(records, 0, cache.decoding_on(device if device.type == "cuda" else None)),
                         args.batch_size, args.workers,
                         shuffle=True, drop_last=True, seed=0)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    pipeline_step = contrastive_step(model, args.method, args.arch, args.batch_size, device, precision,
                                     lambda images: tuple(augment(images) for augment in augments))

    def model_only_one() -> int:
        model_step(None, None)
        return args.batch_size

    def pipeline_one() -> int:
        images, _, ok = next(batches)
        pipeline_step(images[ok].to(device, non_blocking=True), None)
        return int(ok.sum())
    rates = timed_rates({"model_only": model_only_one, "pipeline": pipeline_one}, args.warmup, args.steps, device)
    model_only_per_s, pipeline_per_s = rates["model_only"], rates["pipeline"]

    baseline_per_s = None
    if not args.skip_baseline and args.dims == 2:  # the papers' per-sample PIL path exists for images only
        reference = pretraining_model(args.method, args.arch, reference=True).to(device)
        reference.train()
        papers_views = [pil_views(view_recipe(view, "paper"), view.size) for view in views]
        reference_loader = DataLoader(DecodeAndAugmentEveryTime(records, papers_views),
                                      batch_size=args.batch_size, shuffle=True, drop_last=True,
                                      num_workers=args.workers, persistent_workers=args.workers > 0,
                                      pin_memory=device.type == "cuda")
        reference_batches = itertools.chain.from_iterable(itertools.repeat(reference_loader))
        reference_step = contrastive_step(reference, args.method, args.arch, args.batch_size, device, None,
                                          lambda views: tuple(views))

        def baseline_one() -> int:
            batch = [view.to(device, non_blocking=True) for view in next(reference_batches)]
            reference_step(batch, None)
            return len(batch[0])
        baseline_per_s = timed_rates({"baseline": baseline_one}, args.warmup, args.steps, device)["baseline"]

    peak_memory = peak_memory_mb(device)  # before the flop counter and the profiler add their own
    flops_per_item = step_flops(model_only_one) / args.batch_size
    peak_flops = matmul_flops_per_s(device, precision)
    calls_per_step = operator_calls_per_step(model_only_one)
    return {
        "model_only_per_s": model_only_per_s,
        "pipeline_per_s": pipeline_per_s,
        "efficiency": pipeline_per_s / model_only_per_s,
        "gflop_per_item": flops_per_item / 1e9,
        "matmul_tflop_per_s": peak_flops / 1e12,
        "mfu": pipeline_per_s * flops_per_item / peak_flops,
        "model_only_mfu": model_only_per_s * flops_per_item / peak_flops,
        "operator_calls_per_step": calls_per_step,
        "baseline_per_s": baseline_per_s,
        "speedup_vs_baseline": pipeline_per_s / baseline_per_s if baseline_per_s else None,
        "decode_per_s": decode_per_s,
        "cache_read_per_s": cache_read_per_s,
        **store,
        "cache_vs_decode": cache_read_per_s / decode_per_s,
        "peak_memory_mb": peak_memory,
        "unit": f"{'image' if args.dims == 2 else 'volume'} pairs/s" if len(views) == 2
        else f"images/s ({len(views)} views each)",
        "views": [f"{view.recipe} {shown_size(inputs.view_size(view))}" for view in views],
        "views_per_s": pipeline_per_s * len(views),
        "model_only_views_per_s": model_only_per_s * len(views),
        # what multi-crop costs in input pixels, against two views at the input size
        "pixels_vs_two_views": sum(voxels(inputs.view_size(view)) for view in views) / (2 * voxels(inputs.size)),
        "device": device_name(device),
        "precision": precision_name(precision),
        "torch": torch.__version__,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "images": len(records),
    }


def store_figures(cache: DecodedImageCache | ShardedImageStore, decoded: Dataset, records: list[ImageRecord],
                  sample: int = 100) -> dict:
    """What the store costs and keeps: its codec, bytes per item on disk, and on up to `sample` items its fidelity
    to the uncompressed decode (PSNR of 8-bit images, mean and lowest; the largest grey-level error)."""
    rows = [cache.row(record) for record in records]
    errors, psnrs = [], []
    for index in np.linspace(0, len(records) - 1, min(sample, len(records))).astype(int):
        stored, readable = cache.read(rows[index])
        if not readable:
            continue
        reference = decoded[int(index)][0].numpy().astype(np.float64)
        difference = stored.numpy().astype(np.float64) - reference
        errors.append(float(np.abs(difference).max()))
        mse = float(np.mean(difference ** 2))
        psnrs.append(math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse))
    return {"codec": str(cache.codec), "store_kb_per_item": cache.bytes_on_disk / len(records) / 1024,
            "shards": len(cache.shards) or None,
            "psnr_mean_db": float(np.mean(psnrs)) if psnrs else None,
            "psnr_min_db": float(np.min(psnrs)) if psnrs else None,
            "max_error": max(errors, default=None)}


def benchmark_inputs(args: argparse.Namespace, description: DatasetDescription, data_root: Path) -> InputSpace:
    """The benchmark's inputs: images of --image-size, or volumes on the dataset's grid (or --volume-size and
    --voxel-size), settled as a run settles them."""
    config = settled_inputs(RunConfig(data_root=data_root, output_dir=data_root, split_dir=data_root,
                                      image_size=args.image_size, dims=args.dims, volume_size=args.volume_size,
                                      voxel_size=args.voxel_size), description)
    return input_space(config, description)


def voxels(size: int | tuple[int, ...]) -> int:
    """Pixels of a square input of side `size`, or voxels of a volume's (D, H, W)."""
    return size * size if isinstance(size, int) else math.prod(size)


def shown_size(size: int | tuple[int, ...]) -> str:
    return f"{size} px" if isinstance(size, int) else f"{'x'.join(map(str, size))} voxels"


def side_by_side(runs: dict[str, dict]) -> str:
    """A table of several methods' or stores' figures: per image and per view, or a store's bytes and fidelity."""
    if all("pipeline_per_s" not in figures for figures in runs.values()):
        lines = ["| codec | KB per item | PSNR mean dB | PSNR min dB | max grey error | read+decode per core /s |",
                 "|---|---|---|---|---|---|"]
        for figures in runs.values():
            lines.append(f"| {figures['codec']} | {figures['store_kb_per_item']:.1f} | "
                         f"{shown_db(figures['psnr_mean_db'])} | {shown_db(figures['psnr_min_db'])} | "
                         f"{figures['max_error']:.0f} | {figures['cache_read_per_s']:.0f} |")
        return "\n".join(lines)
    lines = ["| method | codec | views | images/s | views/s | model-only views/s | efficiency | KB per item | "
             "input pixels vs 2 views |", "|---|---|---|---|---|---|---|---|---|"]
    for figures in runs.values():
        lines.append(f"| {figures['settings']['method']} | {figures['codec']} | {len(figures['views'])} | "
                     f"{figures['pipeline_per_s']:.1f} | {figures['views_per_s']:.1f} | "
                     f"{figures['model_only_views_per_s']:.1f} | {figures['efficiency']:.2f} | "
                     f"{figures['store_kb_per_item']:.1f} | {figures['pixels_vs_two_views']:.2f} |")
    return "\n".join(lines)


def shown_db(value: float | None) -> str:
    return "-" if value is None else "lossless" if math.isinf(value) else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m mirl.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", nargs="+", choices=sorted(METHODS), default=["mocov2"],
                        help="one method, or several measured one after another on the same data (side by side)")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=image_size, default=224)
    parser.add_argument("--dims", type=int, choices=SPATIAL_DIMS, default=2,
                        help="3: volumes (RSNA series) with a 3-D encoder (--arch resnet18_3d --volume-size 32 32 32)")
    parser.add_argument("--volume-size", type=volume_side, nargs=3, default=None, metavar=("D", "H", "W"))
    parser.add_argument("--voxel-size", type=positive_float, nargs=3, default=None, metavar=("Z", "Y", "X"))
    parser.add_argument("--batch-size", type=batch_size, default=256)
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps of each kind")
    parser.add_argument("--warmup", type=non_negative_int, default=5, help="untimed steps before each measurement")
    parser.add_argument("--workers", type=non_negative_int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="rsna")
    parser.add_argument("--data-root", type=Path, default=None, help="default: sample RSNA DICOMs in a temp folder")
    parser.add_argument("--cache", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--codec", type=codec_flag, nargs="+", default=["raw"],
                        help="how the cache stores images: raw, or compressed stores (jpeg:95 zstd ...), each "
                             "measured in turn on the same data (side by side)")
    parser.add_argument("--store-only", action="store_true",
                        help="only each store's bytes, fidelity and read rate (no training steps)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    def benchmark() -> None:
        with tempfile.TemporaryDirectory(prefix="mirl-benchmark-") as scratch:
            data_root = args.data_root
            if data_root is None:
                needed = (args.warmup + args.steps + 1) * args.batch_size
                # images: enough 512 px slices that no image repeats; volumes (one per patient): four batches of
                # 256 px series, read again and again from the cache (a read costs the same the second time)
                patients, size = (max(8, math.ceil(needed / 8)), 512) if args.dims == 2 else \
                    (max(8, 4 * args.batch_size), 256)
                data_root = write_rsna(Path(scratch) / "data", patients=patients, size=size,
                                       workers=os.cpu_count() or 1)
            else:
                DATASETS[args.dataset].check_root(data_root)
            cache = args.cache or Path(scratch) / "cache"
            runs = {f"{method} {codec}": run_benchmark(argparse.Namespace(**{**vars(args), "method": method,
                                                                             "codec": codec}), data_root, cache)
                    for method in (args.method[:1] if args.store_only else args.method) for codec in args.codec}
        results = next(iter(runs.values())) if len(runs) == 1 else runs
        if len(runs) > 1:
            print(side_by_side(runs))
        text = json.dumps(results, indent=2)
        if args.json:
            args.json.write_text(text + "\n")
        print(text)
    return guarded(benchmark)


if __name__ == "__main__":
    sys.exit(main())
