"""The review page of folder inference: ``OUT/report.html``, the page to open first after a run.

One self-contained HTML file (inline style, no script, nothing fetched from the network) written from
``results.csv``: a summary, then one card per study, the least plausible first (failed studies, then by
``qc_score``), each with its overlay as a thumbnail (linking to the full overlay), a link to the mask, the
QC score and flags, the key measures and any warning or error. File names are HTML-escaped and links
URL-quoted, whatever characters the names hold. Nothing from the DICOM headers is shown: the page names
studies by their file paths only.
"""

from __future__ import annotations

import csv
import datetime
import html
import os
from collections.abc import Mapping, Sequence
from urllib.parse import quote

from .files import atomic_write

REPORT = "report.html"
FLAGGED_BELOW = 0.5  # qc_score under this is flagged (scripts.qc.qc_score)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #111; color: #ddd; }
h1 { font-size: 1.4em; margin: 0 0 .3em 0; }
.summary { margin-bottom: 1.2em; color: #bbb; }
.summary b { color: #fff; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; }
.card { width: 260px; background: #1d1d1d; border: 2px solid #333; border-radius: 6px; padding: 8px;
        font-size: 12.5px; line-height: 1.35; }
.card.flagged { border-color: #d9822b; }
.card.failed { border-color: #d33; }
.card img { width: 100%; height: 300px; object-fit: contain; background: #000; display: block; }
.noimage { height: 300px; display: flex; align-items: center; justify-content: center; background: #000;
           color: #777; }
.name { font-weight: 600; word-break: break-all; margin: 6px 0 2px 0; color: #fff; }
.score { font-weight: 700; }
.flags { color: #f0a35e; word-break: break-word; }
.error { color: #ff6b6b; word-break: break-word; }
.warn { color: #e6c84f; word-break: break-word; }
a { color: #7fb3ff; }
"""


def _href(path: str) -> str:
    """A relative link to ``path`` (relative to the output folder), URL-quoted and HTML-escaped."""
    return html.escape(quote(path.replace(os.sep, "/"), safe="/"), quote=True)


def _order(row: Mapping) -> tuple:
    """Failed studies first, then the lowest qc_score first, then by path."""
    failed = row.get("status") != "ok"
    try:
        score = float(row.get("qc_score") or 0.0)
    except ValueError:
        score = 0.0
    return (not failed, score, row.get("path", ""))


def _measures(row: Mapping) -> list[str]:
    lines = []
    if row.get("lung_area_cm2"):
        lines.append(f"lungs {float(row['lung_area_cm2']):.1f} cm²")
    elif row.get("lung_area_px"):
        lines.append(f"lungs {int(float(row['lung_area_px']))} px")
    if row.get("cardiothoracic_ratio"):
        lines.append(f"CTR {float(row['cardiothoracic_ratio']):.2f}")
    if row.get("rows") and row.get("columns"):
        lines.append(f"{row['rows']} x {row['columns']} px")
    return lines


def _card(row: Mapping, overlay_suffix: str, output_dir: str) -> str:
    mask = row.get("mask") or ""
    overlay = mask[: -len("_seg.png")] + overlay_suffix if mask.endswith("_seg.png") else ""
    failed = row.get("status") != "ok"
    score = row.get("qc_score") or ""
    flagged = failed or (score != "" and float(score) < FLAGGED_BELOW)
    parts = [f'<div class="card{" failed" if failed else " flagged" if flagged else ""}">']
    if overlay and os.path.isfile(os.path.join(output_dir, overlay)):
        parts.append(f'<a href="{_href(overlay)}"><img loading="lazy" src="{_href(overlay)}" alt="overlay"></a>')
    else:
        parts.append('<div class="noimage">no overlay</div>')
    parts.append(f'<div class="name">{html.escape(row.get("path", ""))}</div>')
    if failed:
        parts.append(f'<div class="error">failed: {html.escape(row.get("error", ""))}</div>')
    else:
        parts.append(f'<div><span class="score">QC {html.escape(score)}</span>'
                     + (f' · <a href="{_href(mask)}">mask</a>' if mask else "")
                     + (f' · <a href="{_href(overlay)}">overlay</a>' if overlay else "") + "</div>")
        flags = [f for f in (row.get("qc_flags") or "").split(";") if f]
        if flags:
            parts.append(f'<div class="flags">{html.escape(", ".join(flags))}</div>')
        parts.append(f"<div>{html.escape(' · '.join(_measures(row)))}</div>")
    if row.get("warnings"):
        parts.append(f'<div class="warn">{html.escape(row["warnings"])}</div>')
    parts.append("</div>")
    return "".join(parts)


def render_report(rows: Sequence[Mapping], output_dir: str, overlay_suffix: str = "_overlay.jpg",
                  title: str = "cxr_segmentation: review") -> str:
    """The page's HTML for the rows of results.csv (see the module docstring)."""
    rows = sorted(rows, key=_order)
    n_failed = sum(r.get("status") != "ok" for r in rows)
    n_flagged = sum(r.get("status") == "ok" and r.get("qc_score") not in (None, "")
                    and float(r["qc_score"]) < FLAGGED_BELOW for r in rows)
    n_warned = sum(bool(r.get("warnings")) for r in rows)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    summary = (f"<b>{len(rows)}</b> studies: <b>{len(rows) - n_failed}</b> segmented, <b>{n_flagged}</b> flagged "
               f"by QC (score below {FLAGGED_BELOW}), <b>{n_failed}</b> failed, <b>{n_warned}</b> with a warning. "
               f"Least plausible first. Written {stamp}; the table is <a href=\"results.csv\">results.csv</a>. "
               "Automatic segmentation, research use only.")
    cards = "\n".join(_card(r, overlay_suffix, output_dir) for r in rows)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>"
            f"<h1>{html.escape(title)}</h1><div class=\"summary\">{summary}</div>\n"
            f"<div class=\"grid\">\n{cards}\n</div></body></html>\n")


def write_report(output_dir: str, overlay_suffix: str = "_overlay.jpg", results_csv: str = "results.csv") -> str:
    """Write ``output_dir/report.html`` (atomically) from ``output_dir/results.csv``; returns its path."""
    with open(os.path.join(output_dir, results_csv), newline="") as f:
        rows = list(csv.DictReader(f))
    page = render_report(rows, output_dir, overlay_suffix)
    path = os.path.join(output_dir, REPORT)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)

    atomic_write(path, write)
    return path
