"""Training throughput of the bundle's data path and precision against a naive MONAI pipeline.

    python bench/train_throughput.py --dataset_dir ../shared/data/montgomery --spatial_size 256 --epochs 3

Variants, each in its own process (so peak memory is its own), same network (the bundle's UNet),
loss, optimiser, batch size and threads:
- ``naive``: plain ``monai.data.Dataset`` (every transform, CLAHE included, every iteration) and a
  ``torch.utils.data.DataLoader`` without workers, float32;
- ``bundle_fp32``: the bundle's ``train#dataloader`` (``CacheDataset`` of the deterministic part,
  ``ThreadDataLoader``), float32;
- ``bundle_bf16``: the same with ``cpu_bf16`` (bfloat16 autocast on the CPU).
Reported: images/s per epoch (median over epochs after the first, which warms up), the cache fill
time, peak resident memory. Writes ``bench/results/train_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
RESULTS = Path(__file__).resolve().parent / "results"


def _parser(args):
    from monai.bundle import ConfigParser

    sys.path.insert(0, str(BUNDLE))
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    parser.update(
        {
            "bundle_root": str(BUNDLE),
            "dataset_dir": args.dataset_dir,
            "spatial_size": [args.spatial_size] * 2,
            "batch_size": args.batch_size,
            "cpu_bf16": args.variant == "bundle_bf16",
            "device": "$torch.device('cpu')",
            "num_workers": 2,
        }
    )
    return parser


def run_variant(args) -> dict:
    """Train ``args.epochs`` epochs of one variant and return its measurements."""
    import monai
    from monai.data import Dataset

    monai.utils.set_determinism(0)
    parser = _parser(args)
    start = time.perf_counter()
    if args.variant == "naive":
        dataset = Dataset(parser.get_parsed_content("datalist")["training"],
                          parser.get_parsed_content("train#preprocessing"))
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0)
    else:
        loader = parser.get_parsed_content("train#dataloader")  # builds the cache
    setup_s = time.perf_counter() - start
    network, loss_fn = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
    optimizer, inferer = parser.get_parsed_content("optimizer"), parser.get_parsed_content("inferer")
    network.train()
    epoch_s, n_images = [], 0
    for _ in range(args.epochs):
        start, n_images = time.perf_counter(), 0
        for batch in loader:
            images, labels = batch["image"], batch["label"]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(inferer(images, network), labels)
            loss.backward()
            optimizer.step()
            n_images += images.shape[0]
        epoch_s.append(time.perf_counter() - start)
    steady = epoch_s[1:] or epoch_s
    return {
        "variant": args.variant,
        "images_per_epoch": n_images,
        "epoch_s": epoch_s,
        "median_epoch_s": statistics.median(steady),
        "images_per_s": n_images / statistics.median(steady),
        "setup_s": setup_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset_dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/montgomery"))
    ap.add_argument("--spatial_size", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per variant; the first is not counted")
    ap.add_argument("--variant", choices=["naive", "bundle_fp32", "bundle_bf16"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    rows = []
    for variant in ("naive", "bundle_fp32", "bundle_bf16"):
        cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{variant}: {rows[-1]['images_per_s']:.1f} images/s", flush=True)
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup_vs_naive"] = row["images_per_s"] / base
    report = {
        "command": "python " + " ".join(["bench/" + Path(__file__).name] + sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "settings": {k: v for k, v in vars(args).items() if k != "variant"},
        "results": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"Training throughput, {args.spatial_size}x{args.spatial_size}, batch {args.batch_size}, "
        f"{rows[0]['images_per_epoch']} images per epoch, median of {max(args.epochs - 1, 1)} epoch(s); "
        f"{report['machine']}. `{report['command']}`",
        "",
        "| variant | images/s | epoch (s) | vs naive | setup / cache fill (s) | peak memory (MB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['images_per_s']:.1f} | {r['median_epoch_s']:.1f} | {r['speedup_vs_naive']:.2f}x "
            f"| {r['setup_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    (RESULTS / "train_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
