"""Runs the Model Zoo style unit tests here as the zoo's ``ci/unit_tests/runner.py`` runs them there: from the
root of a model-zoo checkout, with the bundle at ``models/cxr_segmentation`` and the test folder on sys.path
(for ``from utils import ...``). That checkout is a temporary folder per test module holding the release that
tools/package_bundle.py builds (``--folder``), so the tests exercise what is shipped and write nothing here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.append(str(HERE))  # as the runner does for ci/unit_tests: `utils` is this folder's


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory) -> Path:
    """A folder laid out like a model-zoo checkout: models/cxr_segmentation is the packaged bundle."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import package_bundle
    finally:
        sys.path.remove(str(REPO / "tools"))
    root = tmp_path_factory.mktemp("model-zoo")
    package_bundle.build(REPO / "bundle", root / "models", "cxr_segmentation", folder=True)
    return root


@pytest.fixture(autouse=True)
def _run_from_the_zoo_root(zoo_root, monkeypatch):
    monkeypatch.chdir(zoo_root)  # the tests name the bundle "models/cxr_segmentation", as in the zoo


def pytest_pycollect_makeitem(collector, name, obj):
    if name == "test_order":  # the runner's sort key for the test methods (see below), not a test
        return []


def pytest_collection_modifyitems(items):
    """Within each zoo test module, the order of the runner's loader: its test_order (train, eval, infer)."""
    import functools

    def key(item):
        order = getattr(item.module, "test_order", None) if item.path.parent == HERE else None
        return (str(item.path), functools.cmp_to_key(order)(item.name) if order else item.nodeid)

    positions = [i for i, item in enumerate(items) if item.path.parent == HERE]
    for i, item in zip(positions, sorted((items[i] for i in positions), key=key)):
        items[i] = item
