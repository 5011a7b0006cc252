"""MONAI Model Zoo checks of the bundle, called as the zoo's ci/verify_bundle.py calls them, through MONAI's
CLI and API.

- the required files, the version in the changelog, the 25 MB limit per file;
- metadata.json against the schema in tests/schema (a local restatement of the bundle specification:
  with the file present, ``verify_metadata`` does not download anything);
- the zoo's verify steps on the release folder that tools/package_bundle.py writes, with the zoo's own
  arguments: ``verify_metadata`` (schema at eval/schema.json), ``verify_net_in_out`` with its defaults
  (n = p = any = 1) on the inference config, ``ckpt_export`` of models/*.pt to models/verify_model.ts; for the
  lung model and, with their configs, the anatomy UNet and the anatomy InvertedNet;
- ``monai.bundle.load(..., workflow_type="inference" | "train")`` gives the network with the shipped weights;
- inference reads ``dataset_dir`` (the zoo's key), ``input_dir`` being its alias;
- ``ckpt_export`` (TorchScript) and ``onnx_export`` (dynamic batch, height and width), each compared with
  the eager network on a real radiograph preprocessed by train.yaml's own ``validate#preprocessing``;
- inference through the TorchScript and ONNX Runtime overrides gives the eager run's masks.

The weights: bundle/models/model.pt when it is there, else a seeded, freshly initialised UNet.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE, REPO

CONFIGS = BUNDLE / "configs"
META = CONFIGS / "metadata.json"
TRAIN = CONFIGS / "train.yaml"
INFERENCE = CONFIGS / "inference.yaml"
SCHEMA = REPO / "tests" / "schema" / "meta_schema_20240725.json"
MAX_FILE_BYTES = 25 * 1024 * 1024
ONNX_KWARGS = ("{'input_names':['image'],'output_names':['pred'],"
               "'dynamic_axes':{'image':{0:'batch',2:'height',3:'width'},'pred':{0:'batch',2:'height',3:'width'}},"
               "'dynamo':False,'verify':True,'use_ort':True,'atol':1e-4}")


def require(module: str):
    """Import an optional test dependency; missing, it fails under CI and skips elsewhere."""
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{module} is not installed (pip install {module})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class BundleCLI:
    """``python -m monai.bundle ARGS`` in a subprocess, started at once and awaited by ``result()``.

    The bundle's code is on PYTHONPATH (zoo CI does the same). Most of a call's time is importing MONAI,
    so the module's CLI calls are started together (see ``cli_calls``) and run side by side.
    """

    def __init__(self, *args: str, cwd: Path = REPO):
        env = dict(os.environ, PYTHONPATH=str(BUNDLE), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
        self.name = args[0]
        self.proc = subprocess.Popen([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def result(self, timeout: int = 300) -> str:
        """The combined output; fails the test if the command failed."""
        log, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"monai.bundle {self.name} failed:\n{log[-4000:]}"
        return log


def metadata() -> dict:
    return json.loads(META.read_text())


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """bundle/models/model.pt, the shipped weights (a missing file fails the tests that use it)."""
    shipped = BUNDLE / "models" / "model.pt"
    assert shipped.is_file(), f"{shipped} is missing (tools/package_bundle.py --fetch_large_files brings it)"
    return shipped


@pytest.fixture(scope="module")
def cli_calls(weights, tmp_path_factory) -> dict:
    """Every CLI call of this module, started together: {name: (BundleCLI, output file or None)}."""
    out = tmp_path_factory.mktemp("cli")
    ts, onnx = out / "model.ts", out / "model.onnx"
    calls = {
        "verify_metadata": (("verify_metadata", "--meta_file", str(META), "--filepath", str(SCHEMA)), None),
        "ckpt_export": (("ckpt_export", "--net_id", "network_def", "--filepath", str(ts), "--ckpt_file", str(weights),
                         "--meta_file", str(META), "--config_file", str(TRAIN)), ts),
        "onnx_export": (("onnx_export", "--net_id", "network_def", "--filepath", str(onnx), "--ckpt_file",
                         str(weights), "--meta_file", str(META), "--config_file", str(TRAIN),
                         "--input_shape", "[1,1,64,64]", "--converter_kwargs", ONNX_KWARGS), onnx),
    }
    started = {name: (BundleCLI(*args), path) for name, (args, path) in calls.items()}
    yield started
    for cli, _ in started.values():  # a test that failed early leaves its process behind
        if cli.proc.poll() is None:
            cli.proc.kill()
            cli.proc.communicate()


# ---- files, version, size ------------------------------------------------------------------------


def test_required_files_are_present():
    # models/model.pt is trained by the lead and committed with the bundle: until then this test fails
    for rel in ("LICENSE", "configs/metadata.json", "models/model.pt", "docs/README.md", "docs/data_license.txt"):
        assert (BUNDLE / rel).is_file(), f"bundle/{rel} is missing (required by the bundle spec / zoo CI)"
    assert any((CONFIGS / f"inference.{ext}").is_file() for ext in ("json", "yaml", "yml")), "no configs/inference.*"


def test_version_is_semver_and_in_the_changelog():
    meta = metadata()
    version = meta["version"]
    assert re.fullmatch(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)", version), version
    assert version in meta["changelog"], f"version {version} has no changelog entry"


def test_no_bundle_file_exceeds_25_mb():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from package_bundle import select_files
    finally:
        sys.path.remove(str(REPO / "tools"))
    files, _ = select_files(BUNDLE)  # exactly what the package would hold
    too_big = [f"{rel} ({(BUNDLE / rel).stat().st_size / 2**20:.1f} MB)" for rel in files
               if (BUNDLE / rel).stat().st_size > MAX_FILE_BYTES]
    assert not too_big, f"over 25 MB, must go to large_files.yml: {too_big}"


def test_metadata_declares_the_networks_of_the_configs():
    meta = metadata()
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == parser["num_classes"]
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == parser["network_def"]["in_channels"]
    anatomy = CONFIGS / "anatomy.yaml"
    if anatomy.is_file():
        merged = ConfigParser()
        merged.read_config([str(TRAIN), str(anatomy)])
        assert meta["anatomy_network_data_format"]["outputs"]["pred"]["num_channels"] == merged["num_classes"]


# ---- schema ----------------------------------------------------------------------------------------


def test_verify_metadata_cli_accepts_the_metadata(cli_calls):
    require("jsonschema")
    log = cli_calls["verify_metadata"][0].result()
    assert "skipped downloading" in log and "metadata is verified with no error" in log


def test_metadata_has_no_deprecated_optional_packages_key():
    # MONAI >= 1.4 renames optional_packages_version to required_packages_version when it reads the
    # metadata (replacing the real one), e.g. in what ckpt_export embeds: keep only the new key
    assert "optional_packages_version" not in metadata()


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda m: m.pop("version"), "'version' is a required property"),
        (lambda m: m.update(version=1), "1 is not of type 'string'"),
        (lambda m: m.update(version="0.1"), "does not match"),
        (lambda m: m["network_data_format"]["inputs"]["image"].update(num_channels="1"), "'1' is not of type"),
        (lambda m: m["network_data_format"]["outputs"].pop("pred"), "should be non-empty"),
        (lambda m: m["anatomy_network_data_format"]["outputs"]["pred"].pop("channel_def"), "'channel_def' is a"),
        (lambda m: m["eval_metrics"].update(val_mean_dice=None), "None is not of type 'number'"),
        (lambda m: m["changelog"].update({"next": "x"}), "does not match"),
    ],
    ids=["no-version", "version-int", "version-not-semver", "channels-str", "no-output", "anatomy-no-channel-def",
         "metric-null", "changelog-key"],
)
def test_verify_metadata_rejects_broken_metadata(tmp_path, break_it, message):
    require("jsonschema")
    from monai.bundle import verify_metadata

    broken = copy.deepcopy(metadata())
    break_it(broken)
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="Failed validating") as err:
        verify_metadata(meta_file=str(path), filepath=str(SCHEMA))  # the function behind the CLI
    assert message in str(err.value)


# ---- network input / output ------------------------------------------------------------------------


@pytest.mark.parametrize("configs", [["train.yaml"], ["train.yaml", "invertednet.yaml"],
                                     ["inference.yaml", "invertednet.yaml"]], ids=["unet", "invertednet", "infer-inv"])
def test_verify_net_in_out_with_its_defaults(configs, monkeypatch):
    """The networks the zoo's verify steps below do not cover (training configs, a lung InvertedNet), fed what
    verify_net_in_out feeds by default (n = p = any = 1): the metadata's spatial_shape "16*n+16" gives 32 x 32,
    the smallest input the 4-level UNet takes ("16*n" gave 16 x 16, a 1 x 1 bottleneck InstanceNorm rejects)."""
    from monai.bundle import verify_net_in_out

    monkeypatch.syspath_prepend(str(BUNDLE))  # the zoo puts the bundle first on sys.path (scripts.*)
    verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=[str(CONFIGS / c) for c in configs],
                      bundle_root=str(BUNDLE), device="cpu")


def test_spatial_shape_is_the_set_of_sizes_the_networks_take():
    from monai.bundle.scripts import _get_fake_spatial_shape

    for fmt in ("network_data_format", "anatomy_network_data_format"):
        for tensors in metadata()[fmt].values():
            shape = tensors[next(iter(tensors))]["spatial_shape"]
            assert [_get_fake_spatial_shape(shape, n=n) for n in (1, 2, 15, 31)] == \
                [(32, 32), (48, 48), (256, 256), (512, 512)], shape  # multiples of 16 from 32: 256 and 512 too
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    net = parser.get_parsed_content("network_def").eval()
    with pytest.raises(ValueError, match="more than 1 spatial element"), torch.no_grad():
        net(torch.rand(1, 1, 16, 16))  # why not "16*n": 16 x 16 is too small


# ---- the zoo's verify_bundle.py on the release folder --------------------------------------------------

# models: (configs merged after configs/inference.yaml, weights in models/, metadata key of its data format)
ZOO_MODELS = {
    "lungs": ([], "model.pt", "network_data_format"),
    "anatomy": (["configs/anatomy.yaml"], "model_anatomy.pt", "anatomy_network_data_format"),
    "anatomy_invertednet": (["configs/anatomy.yaml", "configs/invertednet.yaml"], "model_anatomy_invertednet.pt",
                            "anatomy_network_data_format"),
}


@pytest.fixture(scope="module")
def zoo_bundle(tmp_path_factory) -> Path:
    """The release as the zoo's CI has it: tools/package_bundle.py's --folder output at models/cxr_segmentation,
    and the schema at eval/schema.json, where the zoo's prepare_schema puts the one it downloads (offline:
    this project's restatement)."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from package_bundle import build
    finally:
        sys.path.remove(str(REPO / "tools"))
    models = tmp_path_factory.mktemp("model-zoo") / "models"
    build(BUNDLE, models, "cxr_segmentation", folder=True)
    bundle = models / "cxr_segmentation"
    (bundle / "eval").mkdir()
    shutil.copy(SCHEMA, bundle / "eval" / "schema.json")
    return bundle


def test_zoo_verify_directory_version_metadata_and_properties(zoo_bundle):
    from monai.bundle import ConfigWorkflow, verify_metadata

    # verify_bundle_directory: the necessary and the preferred files; of configs/inference.{json,yaml,yml} the
    # zoo takes the last it finds, inference.yaml (inference.json is the network alone, for monai.bundle.load)
    for rel in ("configs/metadata.json", "LICENSE", "models/model.pt"):
        assert (zoo_bundle / rel).is_file(), rel
    names = os.listdir(zoo_bundle / "configs")
    found = [f"inference.{s}" for s in ("json", "yaml", "yml") if f"inference.{s}" in names]
    assert found[-1] == "inference.yaml", found
    # verify_version_changes
    meta = json.loads((zoo_bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    # verify_metadata_format
    require("jsonschema")
    verify_metadata(meta_file=str(zoo_bundle / "configs/metadata.json"), filepath=str(zoo_bundle / "eval/schema.json"))
    # verify_bundle_properties: what it checks for an app (supported_apps), here always: the inference properties
    wf = ConfigWorkflow(workflow_type="inference", config_file=str(zoo_bundle / "configs/inference.yaml"),
                        bundle_root=str(zoo_bundle), logging_file=str(zoo_bundle / "configs/logging.conf"),
                        meta_file=str(zoo_bundle / "configs/metadata.json"))
    wf.initialize()
    assert not wf.check_properties()


@pytest.mark.parametrize("model", ZOO_MODELS)
def test_zoo_verify_data_shape_and_torchscript(zoo_bundle, model, monkeypatch):
    """verify_data_shape and verify_torchscript as verify_bundle.py calls them (config, meta_file, bundle_root,
    defaults for everything else); the anatomy models with their configs and their data format. Then the
    exported module must compute what the eager network with the weights loaded strictly computes:
    ckpt_export copies matching weights only, so a mismatch would otherwise pass unseen."""
    from monai.bundle import ckpt_export, verify_net_in_out

    extra, weights, fmt = ZOO_MODELS[model]
    monkeypatch.syspath_prepend(str(zoo_bundle))  # verify(): sys.path = [bundle path] + sys.path
    meta_file = str(zoo_bundle / "configs/metadata.json")
    config_file = [str(zoo_bundle / c) for c in ["configs/inference.yaml", *extra]]
    override = {"_meta_#network_data_format": metadata()[fmt]} if fmt != "network_data_format" else {}
    verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=config_file, bundle_root=str(zoo_bundle),
                      **override)
    ts_path = zoo_bundle / "models" / "verify_model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts_path), ckpt_file=str(zoo_bundle / "models" / weights),
                meta_file=meta_file, config_file=config_file, bundle_root=str(zoo_bundle), **override)

    parser = ConfigParser()
    parser.read_config(config_file)
    parser["bundle_root"] = str(zoo_bundle)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(zoo_bundle / "models" / weights, map_location="cpu", weights_only=True))
    ts = torch.jit.load(str(ts_path), map_location="cpu")
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ts.eval()(x), net.eval()(x), atol=1e-5)


# ---- monai.bundle.load ----------------------------------------------------------------------------------


@pytest.mark.parametrize("workflow_type, config", [("inference", INFERENCE), ("train", TRAIN)])
def test_monai_bundle_load_gives_the_network_with_the_shipped_weights(zoo_bundle, workflow_type, config):
    """load() builds network_def from configs/<workflow_type>.json: the network of the workflow's YAML config."""
    from monai.bundle import load

    net = load("cxr_segmentation", bundle_dir=str(zoo_bundle.parent), workflow_type=workflow_type, device="cpu",
               progress=False)
    assert isinstance(net, torch.nn.Module), type(net)
    shipped = torch.load(zoo_bundle / "models" / "model.pt", weights_only=True)
    state = net.state_dict()
    assert state.keys() == shipped.keys() and all(torch.equal(state[k], shipped[k]) for k in shipped)
    parser = ConfigParser()
    parser.read_config(str(config))
    assert repr(net) == repr(parser.get_parsed_content("network_def"))  # same layers, dropout included


def test_monai_bundle_load_gives_the_anatomy_network(zoo_bundle):
    from monai.bundle import load

    net = load("cxr_segmentation", bundle_dir=str(zoo_bundle.parent), workflow_type="inference", device="cpu",
               model_file="models/model_anatomy.pt", net_override={"out_channels": 3}, progress=False)
    shipped = torch.load(zoo_bundle / "models" / "model_anatomy.pt", weights_only=True)
    state = net.state_dict()
    assert state.keys() == shipped.keys() and all(torch.equal(state[k], shipped[k]) for k in shipped)


# ---- where inference reads ------------------------------------------------------------------------------


def test_inference_reads_dataset_dir_and_input_dir_is_its_alias(tmp_path):
    """The zoo points a bundle at data with dataset_dir; --input_dir still works (and wins when both are given);
    anatomy.yaml merged on top moves neither."""
    from PIL import Image

    for folder, name in (("a", "from_dataset_dir.png"), ("b", "from_input_dir.png")):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / folder / name)
    cases = [({"dataset_dir": str(tmp_path / "a")}, ["from_dataset_dir.png"]),
             ({"input_dir": str(tmp_path / "b")}, ["from_input_dir.png"]),
             ({"dataset_dir": str(tmp_path / "a"), "input_dir": str(tmp_path / "b")}, ["from_input_dir.png"])]
    for configs in ([INFERENCE], [INFERENCE, CONFIGS / "anatomy.yaml"]):
        for override, expected in cases:
            parser = ConfigParser()
            parser.read_config([str(c) for c in configs])
            parser.update({"bundle_root": str(BUNDLE), "output_dir": str(tmp_path / "out"), **override})
            inputs = parser.get_parsed_content("all_inputs")
            assert [Path(i["image"]).name for i in inputs] == expected, (configs, override)


# ---- export and parity -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eager(weights) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval()


@pytest.fixture(scope="module")
def radiograph() -> torch.Tensor:
    """One Montgomery radiograph through train.yaml's validate#preprocessing: a 1 x 1 x 256 x 256 batch."""
    from conftest import shared_dataset

    data = shared_dataset("montgomery")
    name = sorted((data / "images").glob("*.png"))[0].name
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser["bundle_root"] = str(BUNDLE)
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    item = preprocessing({"image": str(data / "images" / name), "label": str(data / "masks" / name)})
    image = item["image"].as_tensor()[None]
    assert image.shape == (1, 1, *parser["spatial_size"]) and image.dtype == torch.float32
    return image


@pytest.fixture(scope="module")
def exported_ts(cli_calls) -> Path:
    cli, path = cli_calls["ckpt_export"]
    assert f"exported to file: {path}" in cli.result()
    return path


@pytest.fixture(scope="module")
def exported_onnx(cli_calls) -> Path:
    require("onnx"), require("onnxscript")
    cli, path = cli_calls["onnx_export"]
    assert f"exported to file: {path}" in cli.result()
    return path


def assert_parity(reference: torch.Tensor, other: torch.Tensor, rtol: float = 0.0):
    """max |other - reference| < 1e-4 + rtol * max |reference|, and the same argmax mask."""
    assert other.shape == reference.shape and other.dtype == torch.float32
    diff, scale = (other - reference).abs().max().item(), reference.abs().max().item()
    assert diff < 1e-4 + rtol * scale, f"max |logit difference| {diff:.2e} (|logits| up to {scale:.1f})"
    assert torch.equal(other.argmax(1), reference.argmax(1)), "argmax masks differ"


def test_ckpt_export_torchscript_matches_eager(exported_ts, eager, radiograph):
    from monai.data import load_net_with_metadata

    ts, meta, extra = load_net_with_metadata(str(exported_ts), map_location="cpu", more_extra_files=["train.json"])
    assert meta["version"] == metadata()["version"]  # metadata and config ride along in extras/
    assert meta["required_packages_version"] == metadata()["required_packages_version"]
    assert json.loads(extra["train.json"])["network_def"]["_target_"] == "UNet"
    ts.eval()
    with torch.no_grad():
        assert_parity(eager(radiograph), ts(radiograph))
        batch = torch.cat([radiograph, radiograph.flip(-1)])
        assert_parity(eager(batch), ts(batch))


def test_onnx_export_matches_eager_in_onnx_runtime(exported_onnx, eager, radiograph):
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(exported_onnx), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("image", "pred")
    assert inp.shape[0] == "batch" and isinstance(inp.shape[2], str) and isinstance(inp.shape[3], str)
    batch = torch.cat([radiograph, radiograph.flip(-1)])  # exported at 1 x 64 x 64: batch and size are dynamic
    with torch.no_grad():
        reference = eager(batch)
    pred = torch.from_numpy(session.run(None, {"image": batch.numpy()})[0])
    # ONNX Runtime's float32 arithmetic is less exact than PyTorch's here: on Montgomery radiographs, with
    # logits up to ~17, ORT is 1.4e-4 (fresh weights) to 1.8e-4 (trained weights) from a float64 reference
    # where eager PyTorch is within 1e-5 of it, with or without ORT's graph optimisations. So the bound is
    # 1e-4 plus 2e-5 of the largest logit (about 4.5e-4 here), and the masks must be the same.
    assert_parity(reference, pred, rtol=2e-5)


# ---- inference through the TorchScript / ONNX overrides ---------------------------------------------


def _infer(config_files: list[Path], input_dir: Path, output_dir: Path, ckpt_path: Path) -> dict[str, np.ndarray]:
    from monai.bundle import ConfigWorkflow
    from PIL import Image

    # amp=False, cpu_bf16=False: the eager run would compute in float16 on CUDA (AMP) or in bfloat16 on a CPU with
    # AVX-512 BF16/AMX (inference.yaml's cpu_bf16 auto) while the exports compute in float32; that rounding flips
    # pixels on the decision boundary, and this compares the exports, not autocast. (inference_onnx.yaml and
    # inference_ts.yaml switch both off themselves.)
    wf = ConfigWorkflow(config_file=[str(c) for c in config_files], workflow_type="inference", logging_file=False,
                        bundle_root=str(BUNDLE), dataset_dir=str(input_dir), output_dir=str(output_dir),
                        ckpt_path=str(ckpt_path), progress=False, num_workers=0, write_overlay=False, amp=False,
                        cpu_bf16=False)
    wf.initialize()
    wf.run()
    wf.finalize()
    masks = {p.name: np.asarray(Image.open(p)) for p in sorted(output_dir.glob("*_seg.png"))}
    assert len(masks) == len(list(input_dir.iterdir())), sorted(os.listdir(output_dir))
    return masks


@pytest.fixture(scope="module")
def two_radiographs(tmp_path_factory) -> Path:
    from conftest import shared_dataset

    folder = tmp_path_factory.mktemp("in")
    for image in sorted((shared_dataset("montgomery") / "images").glob("*.png"))[:2]:
        shutil.copy(image, folder / image.name)
    return folder


@pytest.fixture(scope="module")
def eager_masks(two_radiographs, weights, tmp_path_factory) -> dict[str, np.ndarray]:
    assert INFERENCE.is_file(), f"{INFERENCE} is missing"
    return _infer([INFERENCE], two_radiographs, tmp_path_factory.mktemp("eager"), weights)


@pytest.mark.parametrize("kind", ["ts", "onnx"])
def test_exported_model_inference_gives_the_eager_masks(kind, request, two_radiographs, eager_masks, tmp_path):
    if kind == "onnx":
        require("onnxruntime")
    exported = request.getfixturevalue(f"exported_{kind}")
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    assert parser["handlers"][0]["_target_"] == "CheckpointLoader"  # the override switches off handlers#0
    masks = _infer([INFERENCE, CONFIGS / f"inference_{kind}.yaml"], two_radiographs, tmp_path, exported)
    assert masks.keys() == eager_masks.keys()
    # float32 on both sides (amp=False in _infer). On the CPU the masks are identical. On a GPU, cuDNN (and TF32
    # on Ampere and later) round differently from the CPU, so a pixel whose logits nearly tie may flip:
    # allow 0.1 % of the pixels there (a lung field is ~25 % of a radiograph; its boundary ~1 %).
    on_cpu = not torch.cuda.is_available()
    for name, mask in masks.items():
        differing = np.count_nonzero(mask != eager_masks[name]) / mask.size
        assert differing == 0 if on_cpu else differing <= 1e-3, f"{kind}: {name}: {differing:.2%} of pixels differ"
