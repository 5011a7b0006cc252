"""CUDA code paths, tested on the CPU: device-free weight files, the GPU-resident training cache, a seed per
DDP rank, the `deterministic` switch, the device of a torchrun rank, TorchScript inference without autocast,
and the checks of bench/gpu_smoke.sh. Tests that need a GPU skip without one."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from PIL import Image

from conftest import BUNDLE, REPO

CONFIGS = BUNDLE / "configs"
TRAIN = CONFIGS / "train.yaml"
META = CONFIGS / "metadata.json"


# ---- a network "on the GPU", on a machine without one ---------------------------------------------------------------


class OnGPU(torch.Tensor):
    """A tensor that reports ``cuda:0`` while its values live on the CPU (``inner``).

    Operations run on ``inner`` and stay ``OnGPU``; only a copy to the CPU (``.cpu()``, ``.to("cpu")``)
    gives back a plain CPU tensor. Pickled, it is its ``inner`` tensor: with ``fake_gpu``'s storage tags,
    ``torch.save`` writes it as a GPU run writes a CUDA tensor (location ``cuda:0``).
    """

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, strides=inner.stride(),
                                                   device=torch.device("cuda", 0),
                                                   requires_grad=inner.requires_grad)

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __repr__(self):
        return f"OnGPU({self.inner!r})"

    def __reduce_ex__(self, protocol):
        return self.inner.__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and torch.device(kwargs.get("device") or "cuda").type == "cpu":
            return args[0].inner.clone()  # the copy to the host: a new CPU tensor
        unwrap = torch.utils._pytree.tree_map_only(OnGPU, lambda t: t.inner, (args, kwargs))
        out = func(*unwrap[0], **unwrap[1])
        return torch.utils._pytree.tree_map_only(torch.Tensor, OnGPU, out)


@pytest.fixture
def fake_gpu(monkeypatch):
    """``to_gpu(module)``: the module's parameters become ``OnGPU`` tensors, and ``torch.save`` tags their
    storages ``cuda:0``, so that a file saved from them is what a CUDA run writes: on a machine without CUDA,
    ``torch.load`` without ``map_location`` fails on it with "Attempting to deserialize object on a CUDA
    device", as ``monai.bundle ckpt_export`` did on weights trained on a GPU."""
    on_gpu: set[int] = set()
    location_tag = torch.serialization.location_tag
    monkeypatch.setattr(torch.serialization, "location_tag",
                        lambda storage: "cuda:0" if storage.data_ptr() in on_gpu else location_tag(storage))

    def to_gpu(module: torch.nn.Module) -> torch.nn.Module:
        for owner in module.modules():
            for name, param in list(owner.named_parameters(recurse=False)):
                on_gpu.add(param.data.untyped_storage().data_ptr())
                setattr(owner, name, torch.nn.Parameter(OnGPU(param.data), requires_grad=param.requires_grad))
        assert all(p.device.type == "cuda" for p in module.parameters())
        return module

    return to_gpu


def _unet() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    torch.manual_seed(0)
    return parser.get_parsed_content("network_def")


def _locations(path) -> set[str]:
    """The device tags torch.save wrote for the tensors of ``path``."""
    tags: set[str] = set()
    torch.load(path, map_location=lambda storage, tag: tags.add(tag) or storage, weights_only=True)
    return tags


def _save_best(saver_dir, network) -> None:
    """One validation epoch's end with a better score: the BestModelSaver writes model.pt."""
    from ignite.engine import Engine

    from scripts.handlers import BestModelSaver

    saver = BestModelSaver(str(saver_dir), {"model": network}, key_metric_name="val_mean_dice")
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.state.metrics, engine.state.epoch = {"val_mean_dice": 0.9}, 1
    saver.metrics_completed(engine)


@pytest.mark.parametrize("device", ["fake_cuda", "cuda"])
def test_weights_of_a_gpu_network_are_saved_device_free_and_export_on_the_cpu(device, fake_gpu, tmp_path):
    reference = _unet().eval()
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        network = _unet().cuda()
    else:
        network = fake_gpu(_unet())
    assert next(network.parameters()).device.type == "cuda"
    _save_best(tmp_path, network)

    path = tmp_path / "model.pt"
    assert _locations(path) == {"cpu"}
    state = torch.load(path, weights_only=True)  # as ignite's Checkpoint.load_objects reads it: no map_location
    assert state.keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert state[name].device.type == "cpu" and type(state[name]) is torch.Tensor
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)

    from monai.bundle import ckpt_export
    from monai.data import load_net_with_metadata

    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(path), meta_file=str(META),
                config_file=str(TRAIN))
    exported, _, _ = load_net_with_metadata(str(ts), map_location="cpu")
    image = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(image), reference(image))


def test_resumable_checkpoint_is_device_free(fake_gpu, tmp_path):
    from ignite.engine import Engine

    from scripts.handlers import DeviceFreeCheckpointSaver

    network = fake_gpu(_unet())
    other = torch.nn.Linear(2, 2)
    saver = DeviceFreeCheckpointSaver(str(tmp_path), {"model": network, "other": other}, save_interval=1,
                                      n_saved=1, epoch_level=True)
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    for epoch in (1, 2):
        engine.state.epoch = epoch
        saver.interval_completed(engine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt"]  # n_saved 1: epoch 1 removed
    path = tmp_path / "checkpoint_epoch=2.pt"
    assert _locations(path) == {"cpu"}
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint.keys() == {"model", "other"}
    assert saver._interval_checkpoint.last_checkpoint == path  # still a DiskSaver for ignite


def test_to_cpu_keeps_structure_and_state_dict_metadata():
    from scripts.handlers import to_cpu

    state = torch.nn.BatchNorm1d(2).state_dict()
    tree = {"state": state, "list": [OnGPU(torch.ones(2)), 3], "tuple": (OnGPU(torch.zeros(1)), "a"), "n": 1}
    out = to_cpu(tree)
    assert out["state"]._metadata == state._metadata and list(out["state"]) == list(state)
    assert type(out["list"][0]) is torch.Tensor and out["list"][0].device.type == "cpu" and out["list"][1] == 3
    assert isinstance(out["tuple"], tuple) and out["tuple"][1] == "a" and out["n"] == 1
    plain = torch.ones(3)
    assert to_cpu(plain).data_ptr() == plain.data_ptr()  # already on the CPU: not copied


# ---- the training configuration's device switches -------------------------------------------------------------------


def _parser(*files, **override) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update({"bundle_root": str(BUNDLE), **override})
    return parser


def _names(compose) -> list[str]:
    return [type(t).__name__ for t in compose.transforms]


def test_on_cuda_the_training_cache_and_augmentation_move_to_the_gpu(small_montgomery):
    """Parsed only (nothing is put on the GPU): with a CUDA device, cache_on_device is on by default."""
    parser = _parser(TRAIN, dataset_dir=str(small_montgomery), device="$torch.device('cuda', 0)")
    assert parser.get_parsed_content("cache_on_device") is True
    train = parser.get_parsed_content("train#preprocessing")
    names = _names(train)
    assert names.index("EnsureTyped") + 1 == names.index("ToDeviced") == names.index("RandAffined") - 1
    assert train.transforms[names.index("ToDeviced")].converter.device == torch.device("cuda", 0)
    assert train.transforms[names.index("RandAffined")].rand_affine.rand_affine_grid.device == torch.device("cuda", 0)
    assert "ToDeviced" not in _names(parser.get_parsed_content("validate#preprocessing"))  # validation: CPU cache
    assert parser.get_parsed_content("train#trainer#amp") is True
    assert parser.get_parsed_content("validate#evaluator#amp") is True
    assert parser.get_parsed_content("inferer").enabled is False  # no CPU bfloat16 on CUDA

    cpu = _parser(TRAIN, dataset_dir=str(small_montgomery), device="$torch.device('cpu')")
    assert cpu.get_parsed_content("cache_on_device") is False
    assert "ToDeviced" not in _names(cpu.get_parsed_content("train#preprocessing"))
    assert cpu.get_parsed_content("train#trainer#amp") is False


def _train_one_epoch(tmp_path, data, **override) -> dict:
    wf = ConfigWorkflow(config_file=str(TRAIN), workflow_type="train", bundle_root=str(BUNDLE),
                        dataset_dir=str(data), output_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "ckpt"),
                        progress=False, spatial_size=[64, 64], batch_size=2, max_epochs=1, num_workers=0,
                        device="$torch.device('cpu')", **override)
    wf.initialize()
    if override.get("cache_on_device"):
        dataset = wf.parser.get_parsed_content("train#dataset")
        assert "ToDeviced" in _names(dataset.transform)
        assert all(item["image"].device == torch.device("cpu") for item in dataset._cache)
    wf.run()
    wf.finalize()
    return torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)


def test_cache_on_device_trains_the_same_network(tmp_path, small_montgomery):
    """The switch on (the device being the CPU here) builds a pipeline that trains, and computes what the
    switch off computes: the same augmentation draws, the same weights bit for bit."""
    on = _train_one_epoch(tmp_path / "on", small_montgomery, cache_on_device=True)
    off = _train_one_epoch(tmp_path / "off", small_montgomery, cache_on_device=False)
    assert on.keys() == off.keys()
    for name in on:
        torch.testing.assert_close(on[name], off[name], rtol=0, atol=0, msg=name)


@pytest.fixture
def cudnn_flags():
    """Restores cuDNN's flags (the runs below change them, as training does)."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _augmented_first_image(tmp_path, data, **override):
    wf = ConfigWorkflow(config_file=str(TRAIN), workflow_type="train", bundle_root=str(BUNDLE),
                        dataset_dir=str(data), output_dir=str(tmp_path), ckpt_dir=str(tmp_path), progress=False,
                        spatial_size=[64, 64], num_workers=0, device="$torch.device('cpu')", **override)
    wf.initialize()  # seeds: seed + rank
    parser = wf.parser
    parser.get_parsed_content("train#dataloader")  # (Thread)DataLoader seeds the dataset's random transforms
    dataset = parser.get_parsed_content("train#dataset")
    return parser.get_parsed_content("datalist"), dataset[0]["image"].as_tensor().clone()


def test_each_rank_draws_its_own_augmentation_from_the_same_split(tmp_path, small_montgomery, cudnn_flags):
    split0, image0 = _augmented_first_image(tmp_path / "a", small_montgomery)
    split0_again, image0_again = _augmented_first_image(tmp_path / "b", small_montgomery, rank=0)
    split1, image1 = _augmented_first_image(tmp_path / "c", small_montgomery, rank=1)
    assert split0 == split1 == split0_again  # the data split: seed alone, the same on every rank
    assert torch.equal(image0, image0_again)  # seeded: the same rank draws the same
    assert not torch.equal(image0, image1)  # another rank: another draw for the same image


def test_deterministic_switch_chooses_cudnn_kernels(tmp_path, caplog, cudnn_flags):
    from scripts.handlers import seed_and_select_kernels

    assert seed_and_select_kernels(5, rank=2) == 7
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
    with caplog.at_level(logging.WARNING, logger="scripts.handlers"):
        seed_and_select_kernels(0, deterministic=True, cudnn_benchmark=True)
    assert torch.backends.cudnn.benchmark is False and "cudnn_benchmark is ignored" in caplog.text
    seed_and_select_kernels(0, deterministic=False, cudnn_benchmark=False)
    assert torch.backends.cudnn.deterministic is False and torch.backends.cudnn.benchmark is False

    # through train.yaml: --deterministic False --cudnn_benchmark True
    wf = ConfigWorkflow(config_file=str(TRAIN), workflow_type="train", bundle_root=str(BUNDLE),
                        output_dir=str(tmp_path), ckpt_dir=str(tmp_path), deterministic=False, cudnn_benchmark=True)
    wf.initialize()
    assert torch.backends.cudnn.deterministic is False and torch.backends.cudnn.benchmark is True
    default = ConfigWorkflow(config_file=str(TRAIN), workflow_type="train", bundle_root=str(BUNDLE),
                             output_dir=str(tmp_path), ckpt_dir=str(tmp_path))
    default.initialize()
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False


# ---- torchrun: one GPU per rank --------------------------------------------------------------------------------------


def test_a_rank_gets_its_gpu_or_a_clear_error(monkeypatch):
    from scripts.handlers import local_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device(3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert local_device(0) == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="local rank 1 has no GPU: this machine has 1.*--nproc_per_node=1"):
        local_device(1)

    # multi_gpu_train.yaml: the backend follows the device; on one GPU, rank 1 stops with that message
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    parser = _parser(TRAIN, CONFIGS / "multi_gpu_train.yaml")
    with pytest.raises(RuntimeError) as err:
        parser.get_parsed_content("backend")
    chain, error = [], err.value
    while error is not None:  # MONAI wraps the error of a component that fails to instantiate
        chain.append(str(error))
        error = error.__cause__
    assert any("local rank 1 has no GPU" in message for message in chain), chain
    monkeypatch.setenv("LOCAL_RANK", "0")
    parser = _parser(TRAIN, CONFIGS / "multi_gpu_train.yaml")
    assert parser.get_parsed_content("device") == torch.device("cuda", 0)
    assert parser.get_parsed_content("backend") == "nccl"
    cpu = _parser(TRAIN, CONFIGS / "multi_gpu_train.yaml", device="$torch.device('cpu')")
    assert cpu.get_parsed_content("backend") == "gloo"
    assert cpu.get_parsed_content("cache_on_device") is False


# ---- TorchScript inference -------------------------------------------------------------------------------------------


def test_torchscript_inference_runs_without_autocast():
    files = (CONFIGS / "inference.yaml", CONFIGS / "inference_ts.yaml")
    for device in ("cuda", "cpu"):
        parser = _parser(*files, device=f"$torch.device('{device}')", amp=True, cpu_bf16=True)
        assert parser.get_parsed_content("evaluator#amp") is False
        assert parser.get_parsed_content("inferer").enabled is False
    eager = _parser(CONFIGS / "inference.yaml", device="$torch.device('cuda')")
    assert eager.get_parsed_content("evaluator#amp") is True  # the eager network keeps AMP on CUDA


# ---- bench/gpu_smoke.sh ----------------------------------------------------------------------------------------------


def _smoke():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_smoke
    finally:
        sys.path.remove(str(REPO / "bench"))
    return gpu_smoke


def test_gpu_smoke_checks_fail_on_what_they_guard(tmp_path, fake_gpu):
    smoke = _smoke()
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    network = fake_gpu(torch.nn.Linear(2, 2))
    torch.save(network.state_dict(), bad)  # as before the fix: the tensors keep their device
    torch.save({k: v.cpu() for k, v in network.state_dict().items()}, good)
    smoke.check_device_free(good)
    with pytest.raises(smoke.CheckFailed, match="cuda:0"):
        smoke.check_device_free(bad)

    a, b = tmp_path / "a", tmp_path / "b"
    mask = np.zeros((40, 40), np.uint8)
    mask[5:35, 5:20] = 1
    for folder, m in ((a, mask), (b, mask)):
        folder.mkdir()
        Image.fromarray(m).save(folder / "x_seg.png")
    assert smoke.compare_masks(a, b, 0.999, 0.999)["identical"] == 1
    shifted = np.roll(mask, 3, axis=1)
    Image.fromarray(shifted).save(b / "x_seg.png")
    with pytest.raises(smoke.CheckFailed, match="masks differ"):
        smoke.compare_masks(a, b, 0.99, 0.99)

    summary = tmp_path / "metrics_summary.csv"
    summary.write_text("dataset,structure,metric,unit,n,mean\nmontgomery,lungs,dice,,21,0.9700\n"
                       "all,lungs,dice,,21,0.9700\n")
    record = smoke.check_eval(summary, META, ["montgomery"], 0.002)  # metadata: 0.9718
    assert abs(record["montgomery"]["difference"]) < 0.002
    with pytest.raises(smoke.CheckFailed, match="more than 0.002"):
        smoke.check_eval(summary, META, ["all"], 0.002)  # metadata val_mean_dice: 0.9667


@pytest.mark.skipif(not os.environ.get("CXR_GPU_SMOKE"), reason="set CXR_GPU_SMOKE=1 (about 4 min on 2 CPU cores)")
def test_gpu_smoke_script(tmp_path):
    """bench/gpu_smoke.sh end to end: on a CUDA machine the real run, else its --dry_run on the CPU."""
    args = [] if torch.cuda.is_available() else ["--dry_run"]
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_smoke.sh"), *args, "--work_dir", str(tmp_path / "w"),
                             "--results_dir", str(tmp_path / "results")], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "passed" in (tmp_path / "results" / "gpu_smoke.md").read_text()
