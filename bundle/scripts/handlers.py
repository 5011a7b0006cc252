"""Ignite handlers that MONAI's own do not cover, and the run-time settings that go with them: device-free
checkpoint files, the device of a torchrun process, seeds and cuDNN's kernel choice."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver
from monai.utils import set_determinism

logger = logging.getLogger(__name__)


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it (also inside dicts, lists and tuples) on the CPU, detached.

    A state dict of a network on a GPU holds CUDA tensors, and ``torch.save`` records their device in the
    file: ``torch.load`` then puts them back on that device, which fails on a machine without one
    ("Attempting to deserialize object on a CUDA device") unless the reader passes ``map_location``, which
    ignite's ``Checkpoint.load_objects`` (behind ``monai.bundle ckpt_export`` and ``onnx_export``) does not.
    Tensors already on the CPU are not copied. A state dict's ``_metadata`` (module versions) is kept.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        items = [(k, to_cpu(v)) for k, v in obj.items()]
        try:
            out = type(obj)(items)
        except TypeError:  # a mapping type that cannot be built from pairs
            out = dict(items)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):  # not a named tuple
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class DeviceFreeDiskSaver(DiskSaver):
    """Wraps the ``DiskSaver`` of an ignite ``Checkpoint``: what it writes has every tensor on the CPU.

    It is a ``DiskSaver`` itself (so ``Checkpoint.last_checkpoint`` still works) that hands the copied
    checkpoint to the saver it wraps; that saver keeps its folder, file name and rank-0-only writing.
    """

    def __init__(self, saver: DiskSaver):  # no DiskSaver.__init__: the wrapped saver has set its folder up
        self.saver = saver
        self.dirname, self.save_on_rank = saver.dirname, saver.save_on_rank

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        self.saver(to_cpu(checkpoint), filename, metadata)

    def remove(self, filename: str) -> None:
        self.saver.remove(filename)


class DeviceFreeCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose files hold CPU tensors only, wherever the network ran.

    The weights and resumable checkpoints of a GPU run then load on any machine, with or without a
    ``map_location``; ``CheckpointLoader`` (its ``map_location``) and ``Optimizer.load_state_dict`` move
    them to the device of the run that reads them.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs):
        super().__init__(save_dir, save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = DeviceFreeDiskSaver(checkpoint.save_handler)


class BestModelSaver(DeviceFreeCheckpointSaver):
    """``CheckpointSaver`` for the best key metric, whose ranking survives a resumed run.

    ``state_dict()`` returns the saver's record of the best score so far, so that putting this
    handler in the resumable checkpoint's ``save_dict`` (and ``CheckpointLoader``'s ``load_dict``)
    keeps a resumed run from overwriting ``model.pt`` with a worse model. The weights file itself
    stays a plain state dict, with every tensor on the CPU (see ``DeviceFreeCheckpointSaver``).
    """

    def __init__(self, save_dir: str, save_dict: dict, key_metric_filename: str = "model.pt", **kwargs):
        super().__init__(save_dir, save_dict, save_key_metric=True, key_metric_filename=key_metric_filename, **kwargs)

    def state_dict(self) -> dict:
        return self._key_metric_checkpoint.state_dict()


def local_device(local_rank: int) -> torch.device:
    """The device of a torchrun process: ``cuda:<local_rank>`` when CUDA is there, else the CPU.

    Raises a ``RuntimeError`` that says what to do when the machine has fewer GPUs than processes
    (``torch.cuda.set_device`` would fail later with "invalid device ordinal").
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU: this machine has {count}. Start torchrun with "
            f"--nproc_per_node={count} (one process per GPU), or run CPU processes with "
            "--device \"\\$torch.device('cpu')\" (gloo)"
        )
    return torch.device("cuda", local_rank)


def network_threads(num_workers: int = 0, write_workers: int = 0) -> int:
    """CPU threads for the network in inference: the cores this process may use (divided among torchrun's
    local ranks) less one per reader and writer process, at least 1. More threads than free cores make the
    network, the readers and the writers wait for each other (OpenMP threads spin while they wait)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, cores - int(num_workers) - int(write_workers))


def seed_and_select_kernels(seed: int, rank: int = 0, deterministic: bool = True,
                            cudnn_benchmark: bool = False) -> int:
    """Seed every random generator with ``seed + rank`` and choose cuDNN's convolution kernels.

    - ``seed + rank``: torch, NumPy, ``random`` and every MONAI ``Compose`` or ``DataLoader`` made
      afterwards, so that each torchrun rank draws its own augmentation (rank 0, and a single process,
      draw what ``seed`` alone gives). Data splits take ``seed`` itself and stay the same on all ranks;
      DDP starts every rank from rank 0's weights.
    - ``deterministic`` true: cuDNN uses deterministic convolution algorithms and does not benchmark
      (MONAI's ``set_determinism``); ``cudnn_benchmark`` is then ignored, with a warning. False: cuDNN may
      use non-deterministic algorithms, and with ``cudnn_benchmark`` it times them and keeps the fastest
      for each input shape. Neither changes anything on the CPU.

    Returns the seed used.
    """
    seed = int(seed) + int(rank)
    set_determinism(seed=seed)  # also cudnn.deterministic = True, cudnn.benchmark = False
    if deterministic:
        if cudnn_benchmark:
            logger.warning("cudnn_benchmark is ignored while deterministic is true: "
                           "pass --deterministic False --cudnn_benchmark True for cuDNN's fastest kernels")
    else:
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    return seed
