"""Evaluation at the native resolution of the reference masks, for ``configs/evaluate.yaml``.

- :class:`NativeResolutiond` (post-processing): re-reads the label at its native size and resizes the
  network's logits to that size, before the usual discretisation (argmax or threshold), so that every
  metric compares arrays of the reference mask's own shape;
- :class:`CleanStructuresd` (post-processing, with ``eval_clean``): inference's component and hole clean-up;
- :func:`segmentation_metrics`: Dice, IoU (Jaccard), HD95 and ASSD of each structure with MONAI's
  ``DiceMetric``, ``MeanIoU``, ``HausdorffDistanceMetric(percentile=95)`` and
  ``SurfaceDistanceMetric(symmetric=True)``; distances in mm when the pixel spacing is known, else px;
- :class:`SegmentationReport` (evaluator handler): per-image CSV, summary per data set and structure
  (CSV and Markdown), overlays of the best and worst case of each data set;
- :func:`plot_training_curves`: train loss and validation metrics from the TensorBoard event files.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDistanceMetric
from monai.transforms import MapTransform, Resize
from scipy.stats import bootstrap

from .io import read_radiograph
from .measures import HEART, LUNGS, cardiothoracic_ratio, has_ctr

logger = logging.getLogger(__name__)

METRICS = ("dice", "iou", "hd95", "assd")
DISTANCE_METRICS = ("hd95", "assd")
METRIC_TITLES = {"dice": "Dice", "iou": "IoU (Jaccard)", "hd95": "HD95", "assd": "ASSD"}
CTR_COLUMNS = ("ctr_pred", "ctr_label", "ctr_abs_error")  # cardiothoracic ratio, when heart and lungs are scored


# ---- post-processing ---------------------------------------------------------------------------
class NativeResolutiond(MapTransform):
    """Bring the prediction back to the native size of its reference mask.

    The label is read again from its file (the path in the label's ``filename_or_obj`` metadata) with
    ``load_label``, the config's label reader, so it is the mask as stored, at its own size. The
    prediction (logits or probabilities, channel-first) is resized to that size with ``mode``
    (bilinear by default, anti-aliased when shrinking) and should be discretised afterwards (argmax or
    threshold), like the zoo's ``Invertd`` + ``AsDiscreted``. This assumes that the preprocessing maps
    the whole image onto the network's grid (``Resized``, no crop or pad), as train.yaml does.

    Args:
        keys: the prediction key(s) to resize.
        load_label: a dictionary transform that reads ``{label_key: path}`` into a channel-first label.
        label_key: the label key, replaced by the native label.
        mode: interpolation of the prediction.
    """

    def __init__(self, keys: KeysCollection, load_label, label_key: str = "label", mode: str = "bilinear",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.load_label = load_label
        self.label_key = label_key
        self.mode = mode

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        meta = getattr(d[self.label_key], "meta", {})
        path = meta.get("filename_or_obj")
        if not path:
            raise ValueError(f"NativeResolutiond: '{self.label_key}' has no filename_or_obj metadata to read it again")
        label = self.load_label({self.label_key: path})[self.label_key]
        shape = tuple(label.shape[1:])
        for key in self.key_iterator(d):
            pred = d[key]
            if tuple(pred.shape[1:]) != shape:
                pred = Resize(spatial_size=shape, mode=self.mode, anti_aliasing=True)(pred)
            d[key] = pred
            label = label.to(pred.device)
        d[self.label_key] = label
        return d


class CleanStructuresd(MapTransform):
    """Clean a discrete prediction as folder inference does (``scripts.postprocessing.clean_structures``):
    keep the largest components of each structure and fill enclosed holes, so that the evaluation scores
    what inference writes.

    The prediction is one-hot or multi-label, channel-first; its last ``len(class_names) - 1`` channels
    are the structures ``class_names[1:]``; a channel before them (softmax background) becomes the
    pixels of no structure.
    """

    def __init__(self, keys: KeysCollection, class_names: Sequence[str], max_components: Mapping[str, int] | None,
                 fill_holes: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.class_names, self.max_components, self.fill_holes = list(class_names), max_components, fill_holes

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        from .postprocessing import clean_structures

        d = dict(data)
        n = len(self.class_names) - 1
        for key in self.key_iterator(d):
            pred = d[key]
            masks = clean_structures(pred[-n:].detach().cpu().numpy() > 0.5, self.class_names,
                                     self.max_components, self.fill_holes)
            out = pred.clone()
            out[-n:] = torch.as_tensor(masks, dtype=pred.dtype, device=pred.device)
            if pred.shape[0] > n:
                out[0] = (out[-n:].sum(0) == 0).to(pred.dtype)
            d[key] = out
        return d


# ---- metrics -----------------------------------------------------------------------------------
_METRIC_FNS = {
    "dice": lambda: DiceMetric(include_background=True, reduction="none"),
    "iou": lambda: MeanIoU(include_background=True, reduction="none"),
    "hd95": lambda: HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none"),
    "assd": lambda: SurfaceDistanceMetric(include_background=True, symmetric=True, reduction="none"),
}


def segmentation_metrics(pred, label, spacing: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """Dice, IoU, HD95 and ASSD of each channel of binary masks ``(K, H, W)`` (one channel per structure).

    Every channel counts (no background channel here: pass the structures only). ``spacing`` is the
    pixel size (rows, columns); distances are in its unit, in pixels when it is None. HD95 is MONAI's
    symmetric 95th-percentile Hausdorff distance, ASSD its symmetric average surface distance, both on
    the mask edges. A distance is NaN where the prediction or the reference of a structure is empty
    (undefined; the Dice of 0 shows the failure), Dice and IoU are NaN where the reference is empty.

    Returns:
        ``{"dice": (K,), "iou": (K,), "hd95": (K,), "assd": (K,)}`` float64 arrays.
    """
    y_pred = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred.detach().cpu())
    y = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label.detach().cpu())
    if y_pred.shape != y.shape or y_pred.ndim != 3:
        raise ValueError(f"expected prediction and reference of the same shape (K, H, W), got {tuple(y_pred.shape)} "
                         f"and {tuple(y.shape)}")
    y_pred = (y_pred > 0.5).float()[None].as_subclass(torch.Tensor)
    y = (y > 0.5).float()[None].as_subclass(torch.Tensor)
    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(is all 0|always_return_as_numpy).*")
        for name, make in _METRIC_FNS.items():
            kwargs = {"spacing": [float(s) for s in spacing]} if name in DISTANCE_METRICS and spacing else {}
            values = make()(y_pred, y, **kwargs)[0].double().numpy()
            out[name] = np.where(np.isfinite(values), values, np.nan)
    return out


def image_spacing(meta: Mapping, dataset: str = "", dataset_spacing: Mapping | None = None):
    """(spacing (rows, columns) or None, unit) of an image from its reader metadata.

    The file's own spacing (``spacing_known`` and ``original_affine`` of :class:`scripts.io.RadiographReader`)
    comes first, then ``dataset_spacing[dataset]`` (mm), else pixels.
    """
    known = meta.get("spacing_known", False)
    known = bool(known.item() if isinstance(known, (torch.Tensor, np.ndarray)) else known)
    if known and meta.get("original_affine") is not None:
        affine = np.asarray(meta["original_affine"], dtype=float)
        return tuple(float(abs(affine[i, i])) for i in range(2)), "mm"
    if dataset_spacing and dataset in dataset_spacing:
        value = dataset_spacing[dataset]
        value = [value, value] if np.isscalar(value) else list(value)
        return tuple(float(v) for v in value), "mm"
    return None, "px"


# ---- summaries -----------------------------------------------------------------------------------
SUMMARY_COLUMNS = ("n", "mean", "ci95_low", "ci95_high", "sd", "median", "min", "max")


def mean_ci95(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """95 % confidence interval of the mean: BCa bootstrap (scipy, 10,000 resamples, fixed seed).

    How far the mean of a validation set of a few dozen images can be trusted: the interval a target
    should be read against. NaN for fewer than two values; a point when every value is the same.
    """
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return math.nan, math.nan
    if v.min() == v.max():
        return float(v[0]), float(v[0])
    ci = bootstrap((v,), np.mean, confidence_level=0.95, n_resamples=10_000, method="BCa",
                   random_state=np.random.default_rng(0)).confidence_interval
    return float(ci.low), float(ci.high)


def _stats(values) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    n = len(v)
    low, high = mean_ci95(v)
    return {
        "n": n,
        "mean": float(v.mean()) if n else math.nan,
        "ci95_low": low,
        "ci95_high": high,
        "sd": float(v.std(ddof=1)) if n > 1 else math.nan,
        "median": float(np.median(v)) if n else math.nan,
        "min": float(v.min()) if n else math.nan,
        "max": float(v.max()) if n else math.nan,
    }


def summarize(rows: Sequence[Mapping], structures: Sequence[str]) -> list[dict]:
    """Rows ``dataset, structure, metric, unit, n, mean, ci95_low, ci95_high, sd, median, min, max``.

    From per-image rows; ``ci95_*`` bound the mean (:func:`mean_ci95`).

    One group per data set, and ``all`` over the data sets when there are several. Distances are
    grouped by unit as well (a data set with a known spacing in mm is not mixed with pixels).
    """
    datasets = sorted({r["dataset"] for r in rows})
    groups = [(d, [r for r in rows if r["dataset"] == d]) for d in datasets]
    if len(datasets) > 1:
        groups.append(("all", list(rows)))
    summary = []
    for name, members in groups:
        for structure in structures:
            for metric in METRICS:
                units = sorted({r["distance_unit"] for r in members}) if metric in DISTANCE_METRICS else [""]
                for unit in units:
                    selected = [r for r in members if not unit or r["distance_unit"] == unit]
                    stats = _stats(r[f"{structure}_{metric}"] for r in selected)
                    summary.append({"dataset": name, "structure": structure, "metric": metric, "unit": unit, **stats})
        if has_ctr(structures):
            for column in CTR_COLUMNS:
                stats = _stats(r[column] for r in members)
                summary.append({"dataset": name, "structure": "cardiothoracic_ratio",
                                "metric": column.removeprefix("ctr_"), "unit": "", **stats})
    return summary


def _fmt(x: float, digits: int) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def summary_markdown(summary: Sequence[Mapping], structures: Sequence[str]) -> str:
    """A Markdown table per data set: mean ± sd (median) [95 % CI of the mean] of each metric and structure."""
    lines = ["# Evaluation at native resolution", "",
             "mean ± sd (median) [95 % bootstrap confidence interval of the mean] over the images; n = images with "
             "a defined value; distances in the unit shown.", ""]
    for dataset in dict.fromkeys(s["dataset"] for s in summary):
        lines += [f"## {dataset}", "", "| structure | n | Dice | IoU (Jaccard) | HD95 | ASSD |",
                  "|---|---|---|---|---|---|"]
        for structure in structures:
            cells = []
            n = 0
            for metric in METRICS:
                parts = []
                for s in summary:
                    if (s["dataset"], s["structure"], s["metric"]) == (dataset, structure, metric):
                        digits = 4 if metric in ("dice", "iou") else 2
                        unit = f" {s['unit']}" if s["unit"] else ""
                        parts.append(f"{_fmt(s['mean'], digits)} ± {_fmt(s['sd'], digits)} "
                                     f"({_fmt(s['median'], digits)}) "
                                     f"[{_fmt(s['ci95_low'], digits)}, {_fmt(s['ci95_high'], digits)}]{unit}")
                        if metric == "dice":
                            n = s["n"]
                cells.append("; ".join(parts))
            lines.append(f"| {structure} | {n} | " + " | ".join(cells) + " |")
        ctr = {s["metric"]: s for s in summary if (s["dataset"], s["structure"]) == (dataset, "cardiothoracic_ratio")}
        if ctr:
            cell = {k: f"{_fmt(v['mean'], 3)} ± {_fmt(v['sd'], 3)} ({_fmt(v['median'], 3)})" for k, v in ctr.items()}
            lines += ["", f"Cardiothoracic ratio (widest heart / widest thorax, n={ctr['abs_error']['n']}): "
                      f"expert {cell['label']}, model {cell['pred']}, |model - expert| {cell['abs_error']}"]
        lines.append("")
    return "\n".join(lines)


def _write_csv(path: Path, rows: Sequence[Mapping], columns: Sequence[str]):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()})


def write_summary(output_dir: Path, rows: Sequence[Mapping], structures: Sequence[str]) -> None:
    """metrics_summary.csv and metrics_summary.md of per-image rows in output_dir; logs the Dice per structure."""
    summary = summarize(rows, structures)
    columns = ["dataset", "structure", "metric", "unit", *SUMMARY_COLUMNS]
    _write_csv(output_dir / "metrics_summary.csv", summary, columns)
    (output_dir / "metrics_summary.md").write_text(summary_markdown(summary, structures))
    for s in summary:
        if s["metric"] == "dice":
            logger.info(f"{s['dataset']:>12s} {s['structure']:>10s}: Dice {_fmt(s['mean'], 4)} "
                        f"(95 % CI {_fmt(s['ci95_low'], 4)}-{_fmt(s['ci95_high'], 4)}) ± {_fmt(s['sd'], 4)} "
                        f"(median {_fmt(s['median'], 4)}, n={s['n']})")
        elif s["metric"] == "abs_error":
            logger.info(f"{s['dataset']:>12s} cardiothoracic ratio: |model - expert| {_fmt(s['mean'], 3)} ± "
                        f"{_fmt(s['sd'], 3)} (median {_fmt(s['median'], 3)}, n={s['n']})")


def _parse_cell(column: str, text: str):
    """A value of metrics_per_image.csv as SegmentationReport wrote it: text, int, or float (empty: NaN)."""
    if column in ("image", "label", "dataset", "spacing", "distance_unit"):
        return text
    if column in ("rows", "cols"):
        return int(text)
    return float(text) if text else math.nan


def summarize_folds(eval_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Pools the evaluations of a cross-validation's folds into one table and summary in output_dir.

    ``eval_dirs`` are the eval_dir of each fold's ``evaluating`` run (``--fold k``); their
    metrics_per_image.csv are concatenated (with a ``fold_dir`` column) and summarised as one
    evaluation does, so every image is scored once, by the model that did not train on it.

    Raises:
        FileNotFoundError: a folder has no metrics_per_image.csv.
        ValueError: no folders, an image is in two folds, or the folds score different structures.
    """
    if not eval_dirs:
        raise ValueError("fold_eval_dirs is empty; give the eval_dir of every fold's evaluating run")
    rows, columns, seen = [], None, {}
    for eval_dir in eval_dirs:
        path = Path(eval_dir) / "metrics_per_image.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; run `evaluating` for that fold first (same --fold, "
                                    f"--output_dir) or correct the folder")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = columns or reader.fieldnames
            if reader.fieldnames != columns:
                raise ValueError(f"{path}: its columns differ from {Path(eval_dirs[0]) / path.name}'s; the folds "
                                 f"must be evaluations of one task (the same structures)")
            for row in reader:
                if row["image"] in seen:
                    raise ValueError(f"{row['image']} is scored in {seen[row['image']]} and in {path}: the folds "
                                     f"overlap; use the folds of one cross-validation (same val_fraction and seed)")
                seen[row["image"]] = path
                rows.append({k: _parse_cell(k, v) for k, v in row.items()} | {"fold_dir": str(eval_dir)})
    structures = [c.removesuffix("_dice") for c in columns if c.endswith("_dice") and c != "mean_dice"]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(output_dir / "metrics_per_image.csv", rows, [*columns, "fold_dir"])
    write_summary(output_dir, rows, structures)
    fold_dirs = [str(d) for d in eval_dirs]
    by_fold = [{"fold_dir": d, **s} for d in fold_dirs
               for s in summarize([r for r in rows if r["fold_dir"] == d], structures)]
    _write_csv(output_dir / "metrics_by_fold.csv", by_fold, ["fold_dir", "dataset", "structure", "metric", "unit",
                                                             *SUMMARY_COLUMNS])
    with open(output_dir / "metrics_summary.md", "a") as f:  # after write_summary's tables
        f.write(fold_dice_markdown(by_fold, fold_dirs))
    logger.info(f"cross-validation: {len(rows)} image(s) from {len(eval_dirs)} fold(s) written to {output_dir}")
    return {"per_image": output_dir / "metrics_per_image.csv", "summary": output_dir / "metrics_summary.csv",
            "markdown": output_dir / "metrics_summary.md", "by_fold": output_dir / "metrics_by_fold.csv"}


def fold_dice_markdown(by_fold: Sequence[Mapping], fold_dirs: Sequence[str]) -> str:
    """A Markdown table of the mean Dice of each fold per data set and structure, with the mean and sd of
    the fold means (how much the figure of one validation split moves with the split)."""
    names = [Path(d).parent.name if Path(d).name == "eval" else Path(d).name for d in fold_dirs]
    lines = ["## Mean Dice per fold", "", "Each fold's mean over its own validation images (folds named by their "
             "folder); the last two columns are the mean and the sd of those fold means.", "",
             "| data set | structure | " + " | ".join(names) + " | mean | sd |",
             "|---|---|" + "---|" * (len(fold_dirs) + 2)]
    groups = dict.fromkeys((s["dataset"], s["structure"]) for s in by_fold if s["metric"] == "dice")
    for dataset, structure in groups:
        means = {s["fold_dir"]: s["mean"] for s in by_fold
                 if (s["dataset"], s["structure"], s["metric"]) == (dataset, structure, "dice")}
        values = np.array([means.get(d, math.nan) for d in fold_dirs], dtype=float)
        finite = values[np.isfinite(values)]
        sd = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
        mean = float(finite.mean()) if finite.size else math.nan
        lines.append(f"| {dataset} | {structure} | " + " | ".join(_fmt(v, 4) for v in values)
                     + f" | {_fmt(mean, 4)} | {_fmt(sd, 4)} |")
    return "\n".join(lines + [""])


# ---- overlays ------------------------------------------------------------------------------------
COLORS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:cyan")


def save_overlay(path: str | os.PathLike, image_path: str, pred: np.ndarray, label: np.ndarray,
                 structures: Sequence[str], title: str = "") -> Path:
    """PNG of the radiograph with the reference (solid) and predicted (dashed) outline of each structure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    image, _ = read_radiograph(image_path)
    fig = Figure(figsize=(7, 7.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(image, cmap="gray")
    handles = []
    for k, name in enumerate(structures):
        color = COLORS[k % len(COLORS)]
        for mask, style in ((label[k], "solid"), (pred[k], "dashed")):
            if mask.any() and mask.shape == image.shape:
                ax.contour(mask.astype(float), levels=[0.5], colors=[color], linestyles=style, linewidths=1.2)
        handles.append(Line2D([], [], color=color, label=name))
    handles += [Line2D([], [], color="w", linestyle="solid", label="reference"),
                Line2D([], [], color="w", linestyle="dashed", label="prediction")]
    ax.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, facecolor="0.3", labelcolor="w")
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


# ---- the handler ---------------------------------------------------------------------------------
class SegmentationReport:
    """Evaluator handler: per-image metrics at native resolution, summaries and best/worst overlays.

    Reads the post-processed output of each image (discrete ``pred`` and ``label``, ``(C, H, W)``, at
    the native size: see :class:`NativeResolutiond`); the structures are the LAST ``len(structures)``
    channels (after a background channel for softmax models, all channels for sigmoid models). At the
    end of the epoch it writes into ``output_dir``:

    - ``metrics_per_image.csv``: ``image, label, dataset, rows, cols, spacing, distance_unit, mean_dice``
      then ``<structure>_dice, <structure>_iou, <structure>_hd95, <structure>_assd`` per structure;
      ``rows, cols`` are the shape on which the metrics were computed;
      and, when heart and lungs are among the structures, ``ctr_pred, ctr_label, ctr_abs_error``: the
      cardiothoracic ratio (as inference measures it) from the prediction and from the reference;
    - ``metrics_summary.csv``: ``dataset, structure, metric, unit, n, mean, sd, median, min, max``
      (structure ``cardiothoracic_ratio``: metrics ``pred``, ``label``, ``abs_error``);
    - ``metrics_summary.md``: the same as Markdown tables (mean ± sd (median));
    - ``overlays/<dataset>_best_<stem>.png`` and ``overlays/<dataset>_worst_<stem>.png`` (by the mean
      Dice over the structures).

    Args:
        output_dir: the folder to write to (created).
        structures: names of the structures, in channel order.
        dataset_spacing: ``{dataset name: pixel spacing in mm}`` used when the files hold no spacing.
    """

    def __init__(self, output_dir: str, structures: Sequence[str], image_key: str = "image",
                 label_key: str = "label", pred_key: str = "pred", dataset_key: str = "dataset",
                 dataset_spacing: Mapping | None = None, overlays: bool = True):
        self.output_dir = Path(output_dir)
        self.structures = list(structures)
        self.image_key, self.label_key, self.pred_key, self.dataset_key = image_key, label_key, pred_key, dataset_key
        self.dataset_spacing = dict(dataset_spacing or {})
        self.overlays = overlays
        self.rows: list[dict] = []
        self.extremes: dict[str, dict] = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine=None) -> None:
        self.rows, self.extremes = [], {}

    def _get(self, output: Mapping, batch: Mapping, key: str):
        if key in output:
            return output[key]
        return batch.get(key) if isinstance(batch, Mapping) else None

    def collect(self, engine) -> None:
        outputs = engine.state.output
        batches = engine.state.batch
        if isinstance(outputs, Mapping):  # not decollated: one item
            outputs, batches = [outputs], [batches]
        for output, batch in zip(outputs, batches):
            self.add(output, batch)

    def add(self, output: Mapping, batch: Mapping | None = None) -> dict:
        """Metrics of one post-processed item; returns its row."""
        batch = batch or {}
        k = len(self.structures)
        pred, label = output[self.pred_key], output[self.label_key]
        if pred.shape != label.shape or pred.shape[0] < k:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} must have the same "
                             f"shape with at least {k} channels (structures {self.structures})")
        pred = (pred[-k:].detach().cpu().numpy() > 0.5)
        label = (label[-k:].detach().cpu().numpy() > 0.5)
        image = self._get(output, batch, self.image_key)
        meta = dict(getattr(image, "meta", {}) or {})
        label_meta = dict(getattr(output[self.label_key], "meta", {}) or {})
        dataset = self._get(output, batch, self.dataset_key) or ""
        spacing, unit = image_spacing(meta, dataset, self.dataset_spacing)
        values = segmentation_metrics(pred, label, spacing)
        row = {
            "image": str(meta.get("filename_or_obj", "")),
            "label": str(label_meta.get("filename_or_obj", "")),
            "dataset": dataset,
            "rows": int(pred.shape[1]),
            "cols": int(pred.shape[2]),
            "spacing": "" if spacing is None else " ".join(f"{s:g}" for s in spacing),
            "distance_unit": unit,
            "mean_dice": float(np.nanmean(values["dice"])) if np.isfinite(values["dice"]).any() else math.nan,
        }
        for i, structure in enumerate(self.structures):
            for metric in METRICS:
                row[f"{structure}_{metric}"] = float(values[metric][i])
        if self._scores_ctr:
            heart, lungs = self.structures.index(HEART), self.structures.index(LUNGS)
            ctr_pred, ctr_label = (cardiothoracic_ratio(m[heart], m[lungs]) for m in (pred, label))
            row["ctr_pred"] = math.nan if ctr_pred is None else ctr_pred
            row["ctr_label"] = math.nan if ctr_label is None else ctr_label
            row["ctr_abs_error"] = abs(row["ctr_pred"] - row["ctr_label"])
        self.rows.append(row)
        self._track(row, pred, label)
        return row

    def _track(self, row: dict, pred: np.ndarray, label: np.ndarray) -> None:
        if not self.overlays or not row["image"] or not np.isfinite(row["mean_dice"]):
            return
        record = {"row": row, "pred": pred, "label": label}
        slot = self.extremes.setdefault(row["dataset"], {})
        if "best" not in slot or row["mean_dice"] > slot["best"]["row"]["mean_dice"]:
            slot["best"] = record
        if "worst" not in slot or row["mean_dice"] < slot["worst"]["row"]["mean_dice"]:
            slot["worst"] = record

    @property
    def _scores_ctr(self) -> bool:
        return has_ctr(self.structures)

    @property
    def columns(self) -> list[str]:
        return (["image", "label", "dataset", "rows", "cols", "spacing", "distance_unit", "mean_dice"]
                + [f"{s}_{m}" for s in self.structures for m in METRICS]
                + (list(CTR_COLUMNS) if self._scores_ctr else []))

    def write(self, engine=None) -> dict[str, Path]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        files = {"per_image": self.output_dir / "metrics_per_image.csv",
                 "summary": self.output_dir / "metrics_summary.csv",
                 "markdown": self.output_dir / "metrics_summary.md"}
        _write_csv(files["per_image"], self.rows, self.columns)
        write_summary(self.output_dir, self.rows, self.structures)
        if self.overlays:
            overlay_dir = self.output_dir / "overlays"
            overlay_dir.mkdir(exist_ok=True)
            for dataset, slot in sorted(self.extremes.items()):
                for which, record in sorted(slot.items()):
                    row = record["row"]
                    stem = Path(row["image"]).name.split(".")[0]
                    dice = ", ".join(f"{s} {_fmt(row[f'{s}_dice'], 3)}" for s in self.structures)
                    title = f"{dataset}, {which} mean Dice {row['mean_dice']:.3f}: {stem}\nDice: {dice}"
                    path = overlay_dir / f"{dataset}_{which}_{stem}.png"
                    save_overlay(path, row["image"], record["pred"], record["label"], self.structures, title)
                    files[f"{dataset}_{which}"] = path
        logger.info(f"evaluation of {len(self.rows)} image(s) written to {self.output_dir}")
        return files


# ---- training curves -----------------------------------------------------------------------------
def read_scalars(log_dir: str | os.PathLike) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of the scalars in the TensorBoard event files directly in ``log_dir``.

    Files are read oldest first, so a resumed run's values replace those of the run it continued.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(log_dir).glob("events.out.tfevents*"), key=os.path.getmtime) if Path(log_dir).is_dir() else []
    scalars: dict[str, dict[int, float]] = {}
    for file in files:
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            scalars.setdefault(tag, {}).update({int(e.step): float(e.value) for e in acc.Scalars(tag)})
    return scalars


def plot_training_curves(log_dir: str | os.PathLike, path: str | os.PathLike, loss_tag: str = "train_loss"):
    """PNG of the training loss (per iteration) and the epoch metrics (validation Dice...) of a training run.

    Reads the TensorBoard event files that ``TensorBoardStatsHandler`` wrote into ``log_dir`` (train.yaml's
    ``output_dir``). Without event files or scalars it logs that and returns None; otherwise the PNG's path.
    """
    scalars = read_scalars(log_dir)
    if not scalars:
        logger.info(f"no TensorBoard scalars in {log_dir}: training curves skipped")
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epoch_tags = sorted(t for t in scalars if t != loss_tag)
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_metric = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if loss_tag in scalars:
        steps = sorted(scalars[loss_tag])
        ax_loss.plot(steps, [scalars[loss_tag][s] for s in steps], lw=0.8)
    ax_loss.set(title="training loss", xlabel="iteration", ylabel=loss_tag)
    for tag in epoch_tags:
        steps = sorted(scalars[tag])
        ax_metric.plot(steps, [scalars[tag][s] for s in steps], marker="." if len(steps) < 30 else None, label=tag)
    ax_metric.set(title="epoch metrics", xlabel="epoch")
    if epoch_tags:
        ax_metric.legend(fontsize=7)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    logger.info(f"training curves from {log_dir} written to {path}")
    return Path(path)
