"""This repository's stand-in for the Model Zoo's ``ci/unit_tests/utils.py``: the same functions, with the
same arguments and behaviour, so that test_cxr_segmentation.py and test_cxr_segmentation_dist.py run here as
they run in the zoo (where the zoo's own file is used; this one is not submitted).

The one difference: the multi-process command starts ``python -m torch.distributed.run`` with this
interpreter instead of the ``torchrun`` script, which need not be on PATH in a virtual environment.
"""

from __future__ import annotations

import os
import subprocess
import sys

from monai.bundle import ConfigParser, ConfigWorkflow


def export_overrided_config(config_file, override_dict, output_path):
    """Merge config_file (one or a list), apply override_dict and write the result as one JSON config."""
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update(pairs=override_dict)
    ConfigParser.export_config_file(parser.config, output_path, indent=4)


def produce_mgpu_cmd(config_file, meta_file, logging_file=None, nnodes=1, nproc_per_node=2):
    """`torchrun ... -m monai.bundle run --config_file ... --meta_file ...` as a list of arguments."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nnodes={nnodes}",
           f"--nproc_per_node={nproc_per_node}", "-m", "monai.bundle", "run", "--config_file", config_file,
           "--meta_file", meta_file]
    if logging_file is not None:
        cmd += ["--logging_file", logging_file]
    return cmd


def export_config_and_run_mgpu_cmd(config_file, meta_file, override_dict, output_path, custom_workflow=None,
                                   logging_file=None, workflow_type="train", nnode=1, ngpu=2, check_config=False):
    """Write the overridden config to output_path, optionally check its properties, then run it with
    ngpu processes per node. (custom_workflow, which the zoo's version accepts, is not used by this bundle.)"""
    if custom_workflow is not None:
        raise NotImplementedError("this bundle's configs run with monai.bundle run")
    export_overrided_config(config_file=config_file, override_dict=override_dict, output_path=output_path)
    if check_config:
        engine = ConfigWorkflow(workflow_type=workflow_type, config_file=output_path, logging_file=logging_file,
                                meta_file=meta_file)
        engine.initialize()
        missing = engine.check_properties()
        if missing:
            raise ValueError(f"check properties for overrided mgpu configs failed: {missing}")
    cmd = produce_mgpu_cmd(config_file=output_path, meta_file=meta_file, logging_file=logging_file, nnodes=nnode,
                           nproc_per_node=ngpu)
    env = dict(os.environ, PYTHONPATH=override_dict.get("bundle_root", "."))  # the bundle's own code
    subprocess.check_call(cmd, env=env)


def check_workflow(workflow: ConfigWorkflow, check_properties: bool = False):
    """initialize, (check the required properties,) run and finalize a workflow."""
    workflow.initialize()
    if check_properties:
        missing = workflow.check_properties()
        if missing:
            raise ValueError(f"check properties for workflow failed: {missing}")
    workflow.run()
    workflow.finalize()
