"""torchrun with DistributedDataParallel on the CPU (gloo): real data, identical weights, one checkpoint."""

import subprocess
import sys

import torch

from conftest import BUNDLE, REPO

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
           "--spatial_size", "[64,64]", "--batch_size", "2", "--max_epochs", "1", "--progress", "False"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    # 6 training images, 2 per step per rank: 2 iterations on each rank, gradients averaged by DDP
    w0 = torch.load(out / "weights_rank0.pt", weights_only=True)
    w1 = torch.load(out / "weights_rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)

    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint_epoch=1.pt", "model.pt"]
    events = [p.name for p in out.iterdir() if p.name.startswith("events.out.tfevents")]
    assert len({name.split(".")[-2] for name in events}) == 1  # TensorBoard written by one process only
    log = result.stdout + result.stderr
    assert log.count("Epoch[1] Metrics -- val_mean_dice") == 1  # rank 0 logs, rank 1 does not
