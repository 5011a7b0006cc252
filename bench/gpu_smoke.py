"""The checks, data preparation, throughput and report of ``bench/gpu_smoke.sh`` (see there and bench/README.md).

Each sub-command checks one thing and exits non-zero, with a line saying why, when the check fails; what it
measured goes to ``<work>/checks/<name>.json``, which ``report`` gathers into ``gpu_smoke.{json,md}``.

    python bench/gpu_smoke.py prepare --data_root ../shared/data --work W --n_train 16 --n_infer 12
    python bench/gpu_smoke.py check_train --work W --name train --ckpt_dir D --log_dir L --epochs 2
    python bench/gpu_smoke.py check_eval --work W --summary S --metadata M --datasets all montgomery ...
    python bench/gpu_smoke.py compare_masks --work W --name amp_vs_fp32 A B --min_mean_dice 0.995 --min_dice 0.98
    python bench/gpu_smoke.py check_ranks --work W --out_dir O --world_size 2 --backend nccl
    python bench/gpu_smoke.py throughput --work W --device cuda --dataset_dir D --ts W/model.ts
    python bench/gpu_smoke.py report --work W --results_dir bench/results --mode gpu
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"


class CheckFailed(Exception):
    """A smoke check that did not hold; its message is the reason."""


def _save(work: Path, name: str, record: dict) -> None:
    folder = Path(work) / "checks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))


# ---- data ----------------------------------------------------------------------------------------------------


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(src.resolve())


def prepare(data_root: Path, work: Path, n_train: int, n_anatomy: int, n_infer: int) -> dict:
    """Folders of symbolic links to the first images of the shared data (nothing is copied):
    ``data/montgomery`` (n_train image/mask pairs), ``data/jsrt_scr`` (n_anatomy images with masks/ and
    structures/) and ``infer_in`` (n_infer radiographs taken in turn from montgomery, shenzhen, jsrt_scr)."""
    data_root = Path(data_root)
    names = ("montgomery", "shenzhen", "jsrt_scr")
    sets = {name: sorted((data_root / name / "images").glob("*.png")) for name in names}
    for name, images in sets.items():
        if not images:
            raise CheckFailed(f"no images in {data_root / name / 'images'} (give --data_root)")
    for image in sets["montgomery"][:n_train]:
        for sub in ("images", "masks"):
            _link(data_root / "montgomery" / sub / image.name, work / "data" / "montgomery" / sub / image.name)
    structures = [p.name for p in (data_root / "jsrt_scr" / "structures").iterdir() if p.is_dir()]
    for image in sets["jsrt_scr"][:n_anatomy]:
        for sub in ["images", "masks"] + [f"structures/{s}" for s in structures]:
            _link(data_root / "jsrt_scr" / sub / image.name, work / "data" / "jsrt_scr" / sub / image.name)
    order = [image for trio in zip(*sets.values()) for image in trio][:n_infer]
    for image in order:
        _link(image, work / "infer_in" / f"{image.parent.parent.name}_{image.name}")
    return {"montgomery": min(n_train, len(sets["montgomery"])), "jsrt_scr": min(n_anatomy, len(sets["jsrt_scr"])),
            "infer_in": len(order)}


# ---- checks --------------------------------------------------------------------------------------------------


def storage_locations(path: Path) -> set[str]:
    """The device tags that ``torch.save`` wrote for the tensors in ``path`` (read back on the CPU)."""
    import torch

    locations: set[str] = set()

    def record(storage, location):
        locations.add(location)
        return storage

    torch.load(path, map_location=record, weights_only=True)
    return locations


def check_device_free(path: Path) -> None:
    """``path`` holds CPU tensors only and loads as ``monai.bundle ckpt_export`` loads it (no map_location)."""
    import torch

    locations = storage_locations(path)
    if locations - {"cpu"}:
        raise CheckFailed(f"{path} holds tensors saved on {sorted(locations - {'cpu'})}: not device-free")
    torch.load(path, weights_only=True)


def train_losses(log_dir: Path) -> list[float]:
    """The ``train_loss`` values of the TensorBoard events in ``log_dir``, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for name in sorted(os.listdir(log_dir)):
        if name.startswith("events.out.tfevents"):
            acc = EventAccumulator(str(Path(log_dir) / name))
            acc.Reload()
            if "train_loss" in acc.Tags()["scalars"]:
                values += [(e.step, e.value) for e in acc.Scalars("train_loss")]
    return [v for _, v in sorted(values)]


def check_train(ckpt_dir: Path, log_dir: Path, epochs: int, model_file: str = "model.pt") -> dict:
    """A training run's outputs: the best model and ``checkpoint_epoch=<epochs>.pt`` written, both device-free,
    and every logged training loss finite."""
    ckpt_dir = Path(ckpt_dir)
    files = [ckpt_dir / model_file, ckpt_dir / f"checkpoint_epoch={epochs}.pt"]
    for path in files:
        if not path.is_file():
            raise CheckFailed(f"{path} was not written (found {sorted(p.name for p in ckpt_dir.glob('*'))})")
        check_device_free(path)
    losses = train_losses(Path(log_dir))
    if not losses:
        raise CheckFailed(f"no train_loss in the TensorBoard events of {log_dir}")
    if not all(math.isfinite(v) for v in losses):
        raise CheckFailed(f"a training loss is not finite: {losses}")
    return {"files": [str(p) for p in files], "device_free": True, "n_losses": len(losses),
            "first_loss": losses[0], "last_loss": losses[-1]}


def check_eval(summary: Path, metadata: Path, datasets: list[str], tolerance: float = 0.002) -> dict:
    """The mean lung Dice per data set (``all``: every image) of ``run evaluating`` against metadata.json's
    ``eval_metrics``: val_mean_dice for ``all``, val_dice_lungs_<set> for a set (jsrt_scr: _jsrt)."""
    expected_all = json.loads(Path(metadata).read_text())["eval_metrics"]
    with open(summary) as f:
        rows = [r for r in csv.DictReader(f) if r["structure"] == "lungs" and r["metric"] == "dice"]
    got = {r["dataset"]: float(r["mean"]) for r in rows}
    record, bad = {}, []
    for name in datasets:
        key = "val_mean_dice" if name == "all" else f"val_dice_lungs_{name.replace('_scr', '')}"
        if name not in got:
            raise CheckFailed(f"{summary} has no lung Dice for {name} (has {sorted(got)})")
        record[name] = {"dice": got[name], "metadata": expected_all[key], "key": key,
                        "difference": got[name] - expected_all[key]}
        if abs(got[name] - expected_all[key]) > tolerance:
            bad.append(f"{name}: {got[name]:.4f} against {key} {expected_all[key]:.4f}")
    if bad:
        raise CheckFailed(f"Dice more than {tolerance} from metadata.json: " + "; ".join(bad))
    return record


def mask_dice(a, b) -> float:
    """Dice of the foreground (label > 0) of two label maps; 1.0 when both are empty."""
    import numpy as np

    fa, fb = np.asarray(a) > 0, np.asarray(b) > 0
    total = int(fa.sum()) + int(fb.sum())
    return 1.0 if total == 0 else 2.0 * int((fa & fb).sum()) / total


def compare_masks(dir_a: Path, dir_b: Path, min_mean_dice: float, min_dice: float) -> dict:
    """The ``*_seg.png`` label maps of two inference runs: the same files, label values agreeing on nearly all
    pixels, foreground Dice of each pair at least ``min_dice`` and on average at least ``min_mean_dice``."""
    import numpy as np
    from PIL import Image

    names_a = sorted(p.relative_to(dir_a) for p in Path(dir_a).rglob("*_seg.png"))
    names_b = sorted(p.relative_to(dir_b) for p in Path(dir_b).rglob("*_seg.png"))
    if not names_a or names_a != names_b:
        raise CheckFailed(f"different or no masks: {len(names_a)} in {dir_a}, {len(names_b)} in {dir_b}")
    dice, agree = {}, {}
    for name in names_a:
        a, b = np.asarray(Image.open(Path(dir_a) / name)), np.asarray(Image.open(Path(dir_b) / name))
        if a.shape != b.shape:
            raise CheckFailed(f"{name}: shapes {a.shape} and {b.shape}")
        dice[str(name)] = mask_dice(a, b)
        agree[str(name)] = float((a == b).mean())
    record = {"n": len(dice), "mean_dice": statistics.mean(dice.values()), "min_dice": min(dice.values()),
              "min_pixel_agreement": min(agree.values()), "identical": sum(v == 1.0 for v in agree.values())}
    if record["min_dice"] < min_dice or record["mean_dice"] < min_mean_dice:
        raise CheckFailed(f"masks differ: mean Dice {record['mean_dice']:.5f} (at least {min_mean_dice}), "
                          f"min {record['min_dice']:.5f} (at least {min_dice})")
    return record


def check_ranks(out_dir: Path, world_size: int, backend: str) -> dict:
    """A torchrun training: every rank's record (backend, device) and weights, the weights all equal."""
    import torch

    ranks = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    if {r["backend"] for r in ranks} != {backend}:
        raise CheckFailed(f"backends {[r['backend'] for r in ranks]}, expected {backend}")
    weights = [torch.load(Path(out_dir) / f"weights_rank{r}.pt", map_location="cpu", weights_only=True)
               for r in range(world_size)]
    for r, w in enumerate(weights[1:], 1):
        if w.keys() != weights[0].keys() or not all(torch.equal(w[k], weights[0][k]) for k in w):
            raise CheckFailed(f"rank {r} ends with other weights than rank 0")
    return {"ranks": ranks, "identical_weights": True}


# ---- throughput ----------------------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(device_name: str, dataset_dir: str, spatial_size: int, batch_size: int, epochs: int,
                     cache_on_device: bool, amp: bool) -> dict:
    """Training images/s of train.yaml's own data path, network, loss and optimiser (a plain loop with AMP as
    SupervisedTrainer runs it), median over the epochs after the first."""
    import torch
    from monai.bundle import ConfigParser

    sys.path.insert(0, str(BUNDLE))
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": dataset_dir, "spatial_size": [spatial_size] * 2,
                   "batch_size": batch_size, "device": f"$torch.device('{device_name}')",
                   "cache_on_device": cache_on_device})
    import monai

    monai.utils.set_determinism(0)
    device = parser.get_parsed_content("device")
    start = time.perf_counter()
    loader = parser.get_parsed_content("train#dataloader")  # fills the cache
    cache_s = time.perf_counter() - start
    network, loss_fn = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    use_amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    network.train()
    epoch_s, n_images = [], 0
    for _ in range(epochs):
        _sync(device)
        start, n_images = time.perf_counter(), 0
        for batch in loader:
            images, labels = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=use_amp):
                loss = loss_fn(network(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            n_images += images.shape[0]
        _sync(device)
        epoch_s.append(time.perf_counter() - start)
    steady = statistics.median(epoch_s[1:] or epoch_s)
    return {"what": "train", "cache_on_device": cache_on_device, "amp": use_amp, "spatial_size": spatial_size,
            "batch_size": batch_size, "images_per_epoch": n_images, "epoch_s": epoch_s, "cache_fill_s": cache_s,
            "images_per_s": n_images / steady}


def infer_throughput(device_name: str, spatial_size: int, batch_size: int, iterations: int,
                     ts_path: str | None) -> list[dict]:
    """Images/s of the network alone on a batch already on the device: eager float32, eager under CUDA
    autocast (float16), and the exported TorchScript module (float32)."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
    parser.update({"bundle_root": str(BUNDLE), "spatial_size": [spatial_size] * 2,
                   "device": f"$torch.device('{device_name}')"})
    device = parser.get_parsed_content("device")
    network = parser.get_parsed_content("network").eval()
    network.load_state_dict(torch.load(BUNDLE / "models" / "model.pt", map_location=device, weights_only=True))
    variants = [("eager_fp32", network, False)]
    if device.type == "cuda":
        variants.append(("eager_amp", network, True))
    if ts_path:
        variants.append(("torchscript_fp32", torch.jit.load(ts_path, map_location=device).eval(), False))
    batch = torch.rand(batch_size, 1, spatial_size, spatial_size, device=device)
    rows = []
    with torch.no_grad():
        for name, net, amp in variants:
            with torch.autocast(device.type, enabled=amp):
                for _ in range(5):  # warm-up (cuDNN, TorchScript's profiling runs)
                    net(batch)
                _sync(device)
                start = time.perf_counter()
                for _ in range(iterations):
                    net(batch)
                _sync(device)
            seconds = time.perf_counter() - start
            rows.append({"what": "infer_network", "variant": name, "spatial_size": spatial_size,
                         "batch_size": batch_size, "images_per_s": iterations * batch_size / seconds})
    return rows


# ---- report --------------------------------------------------------------------------------------------------


def _machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()
            or platform.machine(), "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(cuda_version=torch.version.cuda, gpus=[torch.cuda.get_device_name(i)
                                                           for i in range(torch.cuda.device_count())],
                    cudnn=torch.backends.cudnn.version())
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        pass
    return info


def report(work: Path, results_dir: Path, mode: str, status: str) -> dict:
    """``gpu_smoke.json`` (every step's time and status, every check's record, the machine, the commit) and
    ``gpu_smoke.md`` (the tables) in ``results_dir``."""
    work, results_dir = Path(work), Path(results_dir)
    steps = []
    tsv = work / "steps.tsv"
    if tsv.is_file():
        for line in tsv.read_text().splitlines():
            name, rc, seconds, *command = line.split("\t")
            steps.append({"step": name, "rc": int(rc), "seconds": float(seconds), "command": " ".join(command)})
    checks = {p.stem: json.loads(p.read_text()) for p in sorted((work / "checks").glob("*.json"))}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    record = {"status": status, "mode": mode, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit,
              "uncommitted_changes": bool(dirty.strip()), "machine": checks.pop("env", None) or _machine(),
              "total_s": sum(s["seconds"] for s in steps), "steps": steps, "checks": checks}
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "gpu_smoke.json").write_text(json.dumps(record, indent=2, default=str))
    (results_dir / "gpu_smoke.md").write_text(markdown(record))
    return record


def markdown(record: dict) -> str:
    machine = record["machine"]
    gpus = ", ".join(machine.get("gpus", [])) or "no GPU"
    lines = [f"# GPU smoke test: {record['status']} ({record['mode']})", "",
             f"{record['date']}, commit {record['commit'][:10]}"
             f"{' + changes' if record['uncommitted_changes'] else ''}; "
             f"{gpus}; torch {machine.get('torch')}, MONAI {machine.get('monai')}, {machine.get('cpu_count')} CPUs. "
             f"Total {record['total_s']:.0f} s.", "",
             "| step | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s['step']} | {'ok' if s['rc'] == 0 else 'FAILED'} | {s['seconds']:.1f} |" for s in record["steps"]]
    throughput = record["checks"].get("throughput", {}).get("rows", [])
    if throughput:
        lines += ["", "| throughput | settings | images/s |", "| --- | --- | --- |"]
        for r in throughput:
            if r["what"] == "train":
                what = f"training, cache_on_device {r['cache_on_device']}, amp {r['amp']}"
            else:
                what = f"inference, network alone, {r['variant']}"
            lines.append(f"| {what} | {r['spatial_size']}², batch {r['batch_size']} | {r['images_per_s']:.1f} |")
    cli = record["checks"].get("cli_inference", {}).get("runs", {})
    if cli:
        lines += ["", "| folder inference (CLI, start-up included) | images | seconds | images/s |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {k} | {v['images']} | {v['seconds']:.1f} | {v['images_per_s']:.2f} |" for k, v in cli.items()]
    comparisons = {k: v for k, v in record["checks"].items() if k.startswith("masks_")}
    if comparisons:
        lines += ["", "| masks compared | n | mean Dice | min Dice | identical |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {k[6:]} | {v['n']} | {v['mean_dice']:.5f} | {v['min_dice']:.5f} | {v['identical']} |"
                  for k, v in comparisons.items()]
    evaluation = record["checks"].get("evaluate", {})
    if evaluation:
        lines += ["", "| evaluate (shipped model.pt) | Dice | metadata.json | difference |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {k} | {v['dice']:.4f} | {v['metadata']:.4f} ({v['key']}) | {v['difference']:+.4f} |"
                  for k, v in evaluation.items()]
    return "\n".join(lines) + "\n"


# ---- command line --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--require_cuda", action="store_true")
    p = sub.add_parser("prepare")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--data_root", type=Path, required=True)
    p.add_argument("--n_train", type=int, default=16)
    p.add_argument("--n_anatomy", type=int, default=8)
    p.add_argument("--n_infer", type=int, default=12)
    p = sub.add_parser("check_train")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--ckpt_dir", type=Path, required=True)
    p.add_argument("--log_dir", type=Path, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--model_file", default="model.pt")
    p.add_argument("--log", type=Path, help="the run's log, which must hold each --expect line")
    p.add_argument("--expect", nargs="*", default=[])
    p = sub.add_parser("check_device_free")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("files", type=Path, nargs="+")
    p = sub.add_parser("check_eval")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--summary", type=Path, required=True)
    p.add_argument("--metadata", type=Path, default=BUNDLE / "configs" / "metadata.json")
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--tolerance", type=float, default=0.002)
    p = sub.add_parser("compare_masks")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("dir_a", type=Path)
    p.add_argument("dir_b", type=Path)
    p.add_argument("--min_mean_dice", type=float, required=True)
    p.add_argument("--min_dice", type=float, required=True)
    p = sub.add_parser("check_ranks")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out_dir", type=Path, required=True)
    p.add_argument("--world_size", type=int, required=True)
    p.add_argument("--backend", required=True)
    p = sub.add_parser("cli_inference")
    p.add_argument("--work", type=Path, required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--spatial_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--ts", help="an exported model.ts to time as well")
    p = sub.add_parser("report")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--results_dir", type=Path, required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--status", default="passed")
    args = ap.parse_args(argv)

    try:
        if args.command == "env":
            info = _machine()
            if args.require_cuda and not info["cuda"]:
                raise CheckFailed("no CUDA device: torch.cuda.is_available() is False (use --dry_run on the CPU)")
            _save(args.work, "env", info)
            print(json.dumps(info))
        elif args.command == "prepare":
            counts = prepare(args.data_root, args.work, args.n_train, args.n_anatomy, args.n_infer)
            _save(args.work, "prepare", counts)
            print(counts)
        elif args.command == "check_train":
            record = check_train(args.ckpt_dir, args.log_dir, args.epochs, args.model_file)
            log = args.log.read_text() if args.log else ""
            missing = [line for line in args.expect if line not in log]
            if missing:
                raise CheckFailed(f"{args.log} lacks {missing}")
            _save(args.work, args.name, record)
            print(record)
        elif args.command == "check_device_free":
            for path in args.files:
                check_device_free(path)
            _save(args.work, args.name, {"files": [str(p) for p in args.files], "device_free": True})
        elif args.command == "check_eval":
            record = check_eval(args.summary, args.metadata, args.datasets, args.tolerance)
            _save(args.work, "evaluate", record)
            print(record)
        elif args.command == "compare_masks":
            record = compare_masks(args.dir_a, args.dir_b, args.min_mean_dice, args.min_dice)
            _save(args.work, f"masks_{args.name}", record)
            print(record)
        elif args.command == "check_ranks":
            record = check_ranks(args.out_dir, args.world_size, args.backend)
            _save(args.work, "torchrun", record)
            print(record)
        elif args.command == "cli_inference":  # images/s of the inference steps, from steps.tsv
            runs = {}
            for line in (args.work / "steps.tsv").read_text().splitlines():
                name, rc, seconds, *_ = line.split("\t")
                out = args.work / "infer" / name.removeprefix("infer_")
                if name.startswith("infer_") and rc == "0" and out.is_dir():
                    n = len(list(out.rglob("*_seg.png")))
                    runs[name] = {"images": n, "seconds": float(seconds), "images_per_s": n / float(seconds)}
            _save(args.work, "cli_inference", {"runs": runs})
        elif args.command == "throughput":
            rows = [train_throughput(args.device, args.dataset_dir, args.spatial_size, args.batch_size, args.epochs,
                                     cache, amp=True) for cache in (False, True)]
            rows += infer_throughput(args.device, args.spatial_size, args.batch_size, args.iterations, args.ts)
            _save(args.work, "throughput", {"rows": rows})
            for r in rows:
                print(r)
        elif args.command == "report":
            record = report(args.work, args.results_dir, args.mode, args.status)
            print(markdown(record))
    except CheckFailed as err:
        print(f"CHECK FAILED ({args.command}): {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
