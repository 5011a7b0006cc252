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

"""Model Zoo unit test of cxr_segmentation (ci/unit_tests/test_cxr_segmentation.py): every workflow config
runs on synthetic radiographs, from the root of a model-zoo checkout (python ci/unit_tests/runner.py -b
cxr_segmentation). The data folder is given as `dataset_dir`, as for any zoo bundle."""

import csv
import os
import shutil
import tempfile
import unittest

import numpy as np
from monai.bundle import ConfigWorkflow
from parameterized import parameterized
from PIL import Image
from utils import check_workflow

BUNDLE_ROOT = "models/cxr_segmentation"
STRUCTURES = ("lungs", "heart", "clavicles")
SMALL_RUN = {  # the configs' own top-level settings, made small
    "bundle_root": BUNDLE_ROOT,
    "spatial_size": [64, 64],
    "batch_size": 4,
    "num_workers": 0,
    "progress": False,
}

TEST_CASE_1 = [{**SMALL_RUN, "max_epochs": 1, "cache_rate": 0.0}, []]  # train, evaluate: lung fields
TEST_CASE_2 = [{**SMALL_RUN, "max_epochs": 1, "cache_rate": 0.0}, ["configs/anatomy.yaml"]]  # train: anatomy
TEST_CASE_3 = [{**SMALL_RUN, "write_overlay": True}, []]  # inference: lung fields
TEST_CASE_4 = [{**SMALL_RUN, "write_overlay": False}, ["configs/anatomy.yaml"]]  # inference: anatomy


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


def _write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


class TestCXRSegmentation(unittest.TestCase):
    def setUp(self):
        """A dataset folder as the bundle reads it: images/<stem>.png, masks/<stem>.png (the lung fields: 0
        background, 1 lungs) and, for anatomy.yaml, structures/<name>/<stem>.png (0/1 masks of the lungs, heart
        and clavicles, which overlap)."""
        self.dataset_dir = tempfile.mkdtemp()
        rng = np.random.default_rng(0)
        shape = (96, 80)  # rows, columns: not square, not the network size
        for s in range(10):
            image = rng.integers(0, 256, size=shape, dtype=np.uint8)
            structures = {name: np.zeros(shape, dtype=np.uint8) for name in STRUCTURES}
            structures["lungs"][20:80, 8:36] = structures["lungs"][20:80, 44:72] = 1
            structures["heart"][50:85, 30:55] = 1
            structures["clavicles"][14:22, 10 + s:70] = 1
            for name, mask in structures.items():
                _write_png(os.path.join(self.dataset_dir, "structures", name, f"cxr_{s}.png"), mask)
                image[mask > 0] //= 2
            _write_png(os.path.join(self.dataset_dir, "images", f"cxr_{s}.png"), image)
            _write_png(os.path.join(self.dataset_dir, "masks", f"cxr_{s}.png"), structures["lungs"])

    def tearDown(self):
        shutil.rmtree(self.dataset_dir)

    def _workflow(self, workflow_type, config_files, override):
        bundle_root = override["bundle_root"]
        return ConfigWorkflow(
            workflow_type=workflow_type,
            config_file=[os.path.join(bundle_root, f) for f in config_files],
            logging_file=os.path.join(bundle_root, "configs/logging.conf"),
            meta_file=os.path.join(bundle_root, "configs/metadata.json"),
            **override,
        )

    @parameterized.expand([TEST_CASE_1, TEST_CASE_2])
    def test_train_eval_config(self, override, extra_configs):
        override = {**override, "dataset_dir": self.dataset_dir}
        bundle_root = override["bundle_root"]
        trainer = self._workflow("train", ["configs/train.yaml", *extra_configs], override)
        check_workflow(trainer, check_properties=True)
        model_file = trainer.parser.get_parsed_content("model_file")
        self.assertTrue(os.path.isfile(os.path.join(bundle_root, "models", model_file)))

        # evaluate.yaml overrides train.yaml, thus the workflow is "train" rather than "eval"
        validator = self._workflow("train", ["configs/train.yaml", *extra_configs, "configs/evaluate.yaml"], override)
        check_workflow(validator, check_properties=True)
        eval_dir = validator.parser.get_parsed_content("eval_dir")
        self.assertTrue(os.path.isfile(os.path.join(eval_dir, "metrics_summary.csv")))

    @parameterized.expand([TEST_CASE_3, TEST_CASE_4])
    def test_infer_config(self, override, extra_configs):
        # the radiographs to segment: dataset_dir is where inference reads (input_dir is its alias)
        override = {**override, "dataset_dir": os.path.join(self.dataset_dir, "images")}
        inferrer = self._workflow("infer", ["configs/inference.yaml", *extra_configs], override)
        check_workflow(inferrer, check_properties=True)
        output_dir = inferrer.parser.get_parsed_content("output_dir")
        with open(os.path.join(output_dir, "results.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        self.assertEqual(sorted(r["status"] for r in rows), ["ok"] * 10)
        labels = np.asarray(Image.open(os.path.join(output_dir, "cxr_0_seg.png")))
        self.assertEqual(labels.shape, (96, 80))
        self.assertLessEqual(int(labels.max()), len(inferrer.parser.get_parsed_content("class_names")) - 1)


if __name__ == "__main__":
    loader = unittest.TestLoader()
    loader.sortTestMethodsUsing = test_order
    unittest.main(testLoader=loader)
