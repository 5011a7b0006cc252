# Copyright (c) 2026 The cxr_segmentation maintainers
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""Model Zoo multi-GPU unit test of cxr_segmentation (ci/unit_tests/test_cxr_segmentation_dist.py): training
with multi_gpu_train.yaml and sharded inference with multi_gpu_inference.yaml, one process per GPU (NCCL).
Without a GPU the same configs run two processes on the CPU (gloo)."""

import csv
import os
import shutil
import tempfile
import unittest

import numpy as np
import torch
from parameterized import parameterized
from PIL import Image
from utils import export_config_and_run_mgpu_cmd

BUNDLE_ROOT = "models/cxr_segmentation"

TEST_CASE_1 = [  # multi-GPU training
    {
        "bundle_root": BUNDLE_ROOT,
        "max_epochs": 1,
        "cache_rate": 0.0,
        "spatial_size": [64, 64],
        "batch_size": 2,
        "num_workers": 0,
        "progress": False,
    }
]

TEST_CASE_2 = [  # sharded inference
    {
        "bundle_root": BUNDLE_ROOT,
        "spatial_size": [64, 64],
        "batch_size": 2,
        "num_workers": 0,
        "write_overlay": False,
    }
]


def test_order(test_name1, test_name2):
    def get_order(name):
        if "train" in name:
            return 1
        if "eval" in name:
            return 2
        if "infer" in name:
            return 3
        return 4

    return get_order(test_name1) - get_order(test_name2)


class TestCXRSegmentationMGPU(unittest.TestCase):
    def setUp(self):
        """images/<stem>.png and masks/<stem>.png (0 background, 1 lungs), as the bundle reads a dataset folder."""
        self.dataset_dir = tempfile.mkdtemp()
        rng = np.random.default_rng(0)
        shape = (96, 80)
        for folder in ("images", "masks"):
            os.makedirs(os.path.join(self.dataset_dir, folder))
        for s in range(10):
            mask = np.zeros(shape, dtype=np.uint8)
            mask[20:80, 8:36] = mask[20:80, 44:72] = 1
            image = rng.integers(0, 256, size=shape, dtype=np.uint8)
            image[mask > 0] //= 2
            Image.fromarray(image).save(os.path.join(self.dataset_dir, "images", f"cxr_{s}.png"))
            Image.fromarray(mask).save(os.path.join(self.dataset_dir, "masks", f"cxr_{s}.png"))
        # one process per GPU; without GPUs, two CPU processes (the configs use gloo then)
        self.n_proc = torch.cuda.device_count() or 2

    def tearDown(self):
        shutil.rmtree(self.dataset_dir)

    @parameterized.expand([TEST_CASE_1])
    def test_train_mgpu_config(self, override):
        override = {**override, "dataset_dir": self.dataset_dir}
        bundle_root = override["bundle_root"]
        export_config_and_run_mgpu_cmd(
            config_file=[os.path.join(bundle_root, "configs/train.yaml"),
                         os.path.join(bundle_root, "configs/multi_gpu_train.yaml")],
            logging_file=os.path.join(bundle_root, "configs/logging.conf"),
            meta_file=os.path.join(bundle_root, "configs/metadata.json"),
            override_dict=override,
            output_path=os.path.join(bundle_root, "configs/train_override.json"),
            ngpu=self.n_proc,
        )
        self.assertTrue(os.path.isfile(os.path.join(bundle_root, "models/model.pt")))

    @parameterized.expand([TEST_CASE_2])
    def test_infer_mgpu_config(self, override):
        # the radiographs to segment: dataset_dir is where inference reads
        override = {**override, "dataset_dir": os.path.join(self.dataset_dir, "images")}
        bundle_root = override["bundle_root"]
        export_config_and_run_mgpu_cmd(
            config_file=[os.path.join(bundle_root, "configs/inference.yaml"),
                         os.path.join(bundle_root, "configs/multi_gpu_inference.yaml")],
            logging_file=os.path.join(bundle_root, "configs/logging.conf"),
            meta_file=os.path.join(bundle_root, "configs/metadata.json"),
            override_dict=override,
            output_path=os.path.join(bundle_root, "configs/inference_override.json"),
            workflow_type="infer",
            ngpu=self.n_proc,
        )
        with open(os.path.join(bundle_root, "eval/results.csv"), newline="") as f:  # one file for all ranks
            self.assertEqual(sorted(r["status"] for r in csv.DictReader(f)), ["ok"] * 10)


if __name__ == "__main__":
    loader = unittest.TestLoader()
    loader.sortTestMethodsUsing = test_order
    unittest.main(testLoader=loader)
