"""Quality control of inference (scripts/qc.py) and the review page (scripts/report.py).

The shipped models (lung UNet and QC model) run on real validation radiographs and on inputs made from
them or from scratch that are not frontal chest radiographs; the page is parsed and every link followed.
"""

import csv
import html.parser
import os
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from conftest import BUNDLE
from dicom_fixtures import write_dicom
from test_inference import _rows, _workflow

QC_MODEL = BUNDLE / "models" / "qc_model.npz"


def test_qc_model_round_trip_limits_and_score(tmp_path):
    from scripts.qc import FLAG_RATIO, QCModel, _PCA, qc_score

    rng = np.random.default_rng(0)
    base = rng.random((32, 32))
    images = np.stack([base + 0.05 * rng.standard_normal((32, 32)) for _ in range(200)])
    model = QCModel({"appearance": _PCA.fit(images)})
    model.save(str(tmp_path / "m.npz"))
    loaded = QCModel.load(str(tmp_path / "m.npz"))  # np.load(allow_pickle=False): no code from the file
    np.testing.assert_allclose(loaded.parts["appearance"].limits, model.parts["appearance"].limits, rtol=1e-6)
    # an image like the fitted ones is inside the limits, a different one far outside
    alike = base + 0.05 * rng.standard_normal((32, 32))
    assert loaded.parts["appearance"].ratio(alike) < 1.0 < loaded.parts["appearance"].ratio(rng.random((32, 32)))
    # the limits come from held-out images: about 0.5 % of new images like the fitted ones exceed them
    fresh = np.stack([base + 0.05 * rng.standard_normal((32, 32)) for _ in range(400)])
    exceeded = np.mean([loaded.parts["appearance"].ratio(f) > 1 for f in fresh])
    assert exceeded < 0.03
    assert qc_score({}, []) == 1.0 and qc_score({"a": 1.0}, []) == pytest.approx(0.5)
    assert qc_score({"a": 0.5}, []) > 0.9 and qc_score({"a": 2.0}, []) < 0.06
    flagged = qc_score({"a": 0.1}, ["lung_components!=2"])
    assert flagged == pytest.approx(1 / (1 + FLAG_RATIO ** 4)) and flagged < 0.5


@pytest.fixture(scope="module")
def review_run(tmp_path_factory, montgomery_module, jsrt_module):
    """The shipped lung model on real radiographs (one as a de-identified 12-bit DICOM) and on inputs that
    are not frontal chest radiographs, one with a name made of HTML; a broken file."""
    tmp = tmp_path_factory.mktemp("review")
    root = tmp / "in"
    (root / "real").mkdir(parents=True)
    (root / "other").mkdir()
    from scripts.data import split_datalist

    validation = [p["image"] for p in split_datalist(str(jsrt_module))["validation"][:3]]
    validation += [p["image"] for p in split_datalist(str(montgomery_module))["validation"][:1]]
    for path in validation:
        os.symlink(path, root / "real" / Path(path).name)
    chest = np.asarray(Image.open(validation[0]))
    write_dicom(root / "real" / "study.dcm", chest.astype(np.uint16) * 16, bits_stored=12, deidentified=False,
                patient_id="PID-SECRET-42")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8)).save(root / "other" / "noise.png")
    Image.fromarray(np.rot90(chest, 2).copy()).save(root / "other" / "upside_down.png")
    Image.fromarray(np.rot90(chest, 1).copy()).save(root / "other" / "turned.png")
    Image.fromarray(255 - chest).save(root / "other" / "negative.png")
    Image.fromarray(np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))).save(
        root / "other" / "<img src=x onerror=alert(1)>.png")
    (root / "other" / "broken.png").write_bytes(b"not a png")
    wf = _workflow(tmp, input_dir=str(root), batch_size=4)
    wf.initialize()
    wf.run()
    wf.finalize()
    return root, tmp / "out", _rows(tmp / "out" / "results.csv")


@pytest.fixture(scope="module")
def montgomery_module():
    from conftest import shared_dataset

    return shared_dataset("montgomery")


@pytest.fixture(scope="module")
def jsrt_module():
    from conftest import shared_dataset

    return shared_dataset("jsrt_scr")


def test_real_radiographs_pass_and_other_inputs_are_flagged_by_name(review_run):
    root, out, rows = review_run
    assert QC_MODEL.is_file()
    real = {k: v for k, v in rows.items() if k.startswith("real/")}
    assert len(real) == 5
    for rel, row in real.items():
        assert row["status"] == "ok" and float(row["qc_score"]) >= 0.5 and row["qc_flags"] == "", (rel, row)
    flags = {k: set(v["qc_flags"].split(";")) for k, v in rows.items() if k.startswith("other/") and v["qc_flags"]}
    for rel in ("noise.png", "upside_down.png", "turned.png", "negative.png", "<img src=x onerror=alert(1)>.png"):
        row = rows[f"other/{rel}"]
        assert row["status"] == "ok" and float(row["qc_score"]) < 0.5, (rel, row)
    assert "upside_down" in flags["other/upside_down.png"]
    assert "rotated_90_ccw" in flags["other/turned.png"]
    assert "inverted_grey_scale" in flags["other/negative.png"]
    assert "implausible_lung_shape" in flags["other/noise.png"]
    assert rows["other/broken.png"]["status"] == "failed"


def test_the_review_page_orders_escapes_links_and_hides_identifiers(review_run):
    root, out, rows = review_run
    page = (out / "report.html").read_text(encoding="utf-8")

    class Links(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.links, self.names, self._name = [], [], False

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            for key in ("href", "src"):
                if attrs.get(key):
                    self.links.append(attrs[key])
            self._name = attrs.get("class") == "name"
            assert not (tag == "script" or any(k.startswith("on") for k in attrs)), (tag, attrs)

        def handle_data(self, data):
            if self._name:
                self.names.append(data)
                self._name = False

    parser = Links()
    parser.feed(page)
    # every study has a card, failed first, then the lowest qc_score first
    assert sorted(parser.names) == sorted(rows)
    order = [rows[n] for n in parser.names]
    assert order[0]["status"] == "failed"
    scores = [float(r["qc_score"]) for r in order[1:]]
    assert scores == sorted(scores)
    # every link resolves to a file in the output folder (nothing from the network)
    assert parser.links and all(not link.startswith(("http:", "https:", "//")) for link in parser.links)
    for link in parser.links:
        assert (out / unquote(link)).is_file(), link
    overlays = {unquote(link) for link in parser.links if link.endswith("_overlay.jpg")}
    assert len(overlays) == len(rows) - 1  # all but the broken file
    # a name made of HTML is shown as text, never as markup; no patient identifier from the DICOM header
    assert "<img src=x onerror=alert(1)>" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "PID-SECRET-42" not in page and "Test^Radiograph" not in page
    assert not list(out.glob(".report.html.*"))  # written atomically


def test_ctr_is_left_empty_when_the_chest_is_implausible(tmp_path, jsrt_scr):
    """The anatomy model reports the CTR of a plausible chest and leaves it empty for an upside-down one."""
    chest = np.asarray(Image.open(sorted((jsrt_scr / "images").glob("*.png"))[0]))
    root = tmp_path / "in"
    root.mkdir()
    Image.fromarray(chest).save(root / "upright.png")
    Image.fromarray(np.rot90(chest, 2).copy()).save(root / "upside_down.png")
    wf = _workflow(tmp_path, config_file=[str(BUNDLE / "configs" / n) for n in ("inference.yaml", "anatomy.yaml")],
                   input_dir=str(root), write_overlay=False)
    wf.initialize()
    wf.run()
    wf.finalize()
    rows = _rows(tmp_path / "out" / "results.csv")
    assert rows["upright.png"]["qc_flags"] == "" and 0.3 < float(rows["upright.png"]["cardiothoracic_ratio"]) < 0.7
    assert "upside_down" in rows["upside_down.png"]["qc_flags"]
    assert rows["upside_down.png"]["cardiothoracic_ratio"] == ""


def test_overlay_legend_shows_the_flags():
    from scripts.overlay import legend_lines

    lines = legend_lines(["background", "lungs"], {"lung_area_px": 10, "lung_area_cm2": None,
                                                   "qc_score": 0.12, "qc_flags": ["upside_down"]})
    qc = [text for text, _ in lines if text.startswith("QC")]
    assert qc == ["QC 0.12, flagged: upside_down"]


def test_report_is_written_for_a_run_without_a_qc_model(tmp_path, montgomery):
    """A model trained without a QC model file: the measures' flags alone, and the page still written."""
    from test_inference import _weights

    root = tmp_path / "in"
    root.mkdir()
    for image in sorted((montgomery / "images").glob("*.png"))[:2]:
        os.symlink(image, root / image.name)
    wf = _workflow(tmp_path, input_dir=str(root), qc_model_file=str(tmp_path / "none.npz"), spatial_size=[64, 64],
                   ckpt_path=str(_weights(tmp_path / "w.pt")))
    wf.initialize()
    wf.run()
    wf.finalize()
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["qc_score"] for r in rows)
    assert (tmp_path / "out" / "report.html").is_file()
