"""torchrun on the CPU (gloo): DistributedDataParallel training (real data, identical weights, one checkpoint)
and sharded folder inference (the same outputs as one process, one results.csv, --resume after a kill).

The training test asks for CPU processes (--device cpu, hence gloo) on every machine: on a GPU machine
multi_gpu_train.yaml would otherwise give each rank its own GPU and NCCL, which a one-GPU machine cannot do
for two ranks. bench/gpu_smoke.sh runs torchrun with NCCL on the GPUs."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BUNDLE, REPO
from dicom_fixtures import write_dicom

SAVE_WEIGHTS = """
finalize:
  - "$torch.save(@network.module.state_dict(), @output_dir + '/weights_rank' + str(@rank) + '.pt')"
  - "$torch.distributed.is_initialized() and torch.distributed.destroy_process_group()"
"""


def test_torchrun_two_cpu_processes_train_one_epoch(tmp_path, small_montgomery):
    extra = tmp_path / "save_weights.yaml"
    extra.write_text(SAVE_WEIGHTS)
    out, ckpt = tmp_path / "out", tmp_path / "models"
    configs = [str(BUNDLE / "configs" / n) for n in ("train.yaml", "multi_gpu_train.yaml")] + [str(extra)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "training", "--bundle_root", str(BUNDLE), "--config_file", str(configs),
           "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
           "--logging_file", str(BUNDLE / "configs" / "logging.conf"),
           "--dataset_dir", str(small_montgomery), "--output_dir", str(out), "--ckpt_dir", str(ckpt),
           "--spatial_size", "[64,64]", "--batch_size", "2", "--max_epochs", "1", "--progress", "False",
           "--device", "$torch.device('cpu')"]  # CPU processes over gloo, whatever GPUs the machine has
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    # 6 training images, 2 per step per rank: 2 iterations on each rank, gradients averaged by DDP
    w0 = torch.load(out / "weights_rank0.pt", map_location="cpu", weights_only=True)
    w1 = torch.load(out / "weights_rank1.pt", map_location="cpu", weights_only=True)
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)

    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint_epoch=1.pt", "model.pt"]
    events = [p.name for p in out.iterdir() if p.name.startswith("events.out.tfevents")]
    assert len({name.split(".")[-2] for name in events}) == 1  # TensorBoard written by one process only
    log = result.stdout + result.stderr
    assert log.count("Epoch[1] Metrics -- val_mean_dice") == 1  # rank 0 logs, rank 1 does not


# ---- sharded folder inference -------------------------------------------------------------------------


def _infer(out: Path, inputs: Path, weights: Path, ranks: int = 1, *extra: str) -> str:
    """`monai.bundle run inference` on ``inputs`` as a user runs it: one process, or ``ranks`` torchrun
    processes (gloo) with multi_gpu_inference.yaml merged on top; returns the log."""
    configs = [str(BUNDLE / "configs" / "inference.yaml")]
    launcher = [sys.executable]
    if ranks > 1:
        configs.append(str(BUNDLE / "configs" / "multi_gpu_inference.yaml"))
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={ranks}"]
    extra = ("--device", "$torch.device('cpu')", *extra)  # CPU processes (gloo), also on a machine with GPUs
    cmd = launcher + ["-m", "monai.bundle", "run", "inference", "--bundle_root", str(BUNDLE),
                      "--config_file", str(configs), "--input_dir", str(inputs), "--output_dir", str(out),
                      "--ckpt_path", str(weights), "--spatial_size", "[64,64]", "--batch_size", "2",
                      "--num_workers", "0", "--progress", "False", *extra]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def _outputs(out: Path) -> dict[str, object]:
    """What a run wrote: results.csv's text and every mask and overlay, decoded."""
    files = {"results.csv": (out / "results.csv").read_text()}
    for path in sorted(out.rglob("*_seg.png")) + sorted(out.rglob("*_overlay.*")):
        files[str(path.relative_to(out))] = np.asarray(Image.open(path))
    return files


@pytest.fixture
def inference_folder(tmp_path, montgomery):
    """Seven real radiographs (PNG, two as DICOM) in nested folders and a broken file; seeded weights."""
    from test_inference import _weights

    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    images = sorted((montgomery / "images").glob("*.png"))[:7]
    for k, image in enumerate(images[:5]):
        shutil.copy(image, root / ("a" if k % 2 else "a/b") / image.name)
    for image in images[5:]:
        write_dicom(root / f"{image.stem}.dcm", np.asarray(Image.open(image)), deidentified=True)
    (root / "a" / "empty.png").write_bytes(b"")
    return root, _weights(tmp_path / "w.pt")


def test_torchrun_two_cpu_processes_infer_what_one_process_infers(tmp_path, inference_folder):
    root, weights = inference_folder
    one, two = tmp_path / "one", tmp_path / "two"
    _infer(one, root, weights)
    log = _infer(two, root, weights, 2)
    assert log.count("inference: rank 0 of 2: ") == 1  # rank 1's summary is not logged (warnings only)
    expected = _outputs(one)
    got = _outputs(two)
    assert got.keys() == expected.keys() and len(got) == 1 + 2 * 7
    assert got["results.csv"] == expected["results.csv"]
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert sorted(p.name for p in two.glob("*_seg.dcm")) == sorted(f"{p.stem}_seg.dcm" for p in root.glob("*.dcm"))
    assert not list(two.glob("*.partial"))

    # a sharded run killed part-way: some rows in each rank's partial file, no results.csv, a mask gone
    rows = (two / "results.csv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    (two / "results.csv").unlink()
    (two / "results.rank0.csv.partial").write_text("\n".join([header] + body[0:2]) + "\n")
    (two / "results.rank1.csv.partial").write_text("\n".join([header] + body[4:6]) + "\n")
    done = {body[i].split(",")[0] for i in (0, 1, 4, 5)}
    assert "a/empty.png" not in done  # the failed file is not among them: it is tried again anyway
    redo = Path(body[1].split(",")[0]).with_suffix("")
    (two / f"{redo}_seg.png").unlink()
    finished = [two / f"{Path(rel).with_suffix('')}_seg.png" for rel in done if Path(rel).with_suffix("") != redo]
    kept = {p: p.stat().st_mtime_ns for p in finished}
    assert len(kept) == 3
    log = _infer(two, root, weights, 2, "--resume", "True")
    assert "3 of 8 input(s) done by an earlier run, 5 to do" in log
    assert (two / "results.csv").read_text() == expected["results.csv"]
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished outputs were not redone
    assert not list(two.glob("*.partial"))
    for name in expected:
        if name != "results.csv":
            np.testing.assert_array_equal(np.asarray(Image.open(two / name)), expected[name], err_msg=name)
