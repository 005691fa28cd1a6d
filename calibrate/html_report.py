"""``report.html``: one self-contained page to look at a calibration (or an evaluation).

The page holds the summary tables, the PNG plots and a gallery of images, every picture inlined
as a ``data:`` URI, so the file can be mailed, archived or opened from any folder with no other
file beside it and no network. No script runs in it.

The gallery shows, per image: the image, its true label where the manifest has one, the
annotator's raw argmax, the pseudo-label(s) and the confidence map (the annotator's top
probability), under one legend: class names with their palette colours, the pattern of ignored
pixels (255: dropped by the filter, or unlabeled in the ground truth) and the confidence scale.
Images come worst first (see :func:`rank`).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data_manifest.io import atomic_write_text, read_label_png
from data_manifest.manifest import IGNORE_INDEX, Manifest, Row, id_path

IGNORED_LIGHT, IGNORED_DARK = (255, 255, 255), (176, 176, 176)
CHECKER = 4  # side of the squares of the ignored-pixel pattern, in pixels of the picture
THUMB = 224  # longest side of a gallery picture
RANK_LIMIT = 2000  # at most this many images are read to rank the gallery


def label_rgb(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Class indices uint8 (H, W) as RGB uint8 (H, W, 3): palette colours, and ignored pixels
    (255) as a light grey checkerboard, so that they never pass for a class drawn in white."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: min(len(palette), 255)] = np.asarray(palette[:255], np.uint8)
    out = lut[labels]
    ign = labels == IGNORE_INDEX
    if ign.any():
        yy, xx = np.indices(labels.shape)
        dark = ((yy // CHECKER + xx // CHECKER) % 2).astype(bool)
        out[ign & dark] = IGNORED_DARK
        out[ign & ~dark] = IGNORED_LIGHT
    return out


def _viridis() -> np.ndarray:
    import matplotlib

    lut = matplotlib.colormaps["viridis"](np.linspace(0.0, 1.0, 256))[:, :3]
    return np.round(lut * 255).astype(np.uint8)


def confidence_rgb(conf: np.ndarray) -> np.ndarray:
    """Top probability float (H, W) in [0, 1] as RGB uint8 (H, W, 3) on the viridis scale."""
    idx = np.clip(np.round(np.nan_to_num(conf) * 255), 0, 255).astype(np.uint8)
    return _viridis()[idx]


def thumbnail(rgb: np.ndarray, nearest: bool, side: int = THUMB) -> np.ndarray:
    """At most ``side`` pixels on the longest side (labels: nearest neighbour; pictures: area)."""
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def png_uri(rgb: np.ndarray) -> str:
    """A ``data:image/png`` URI of an RGB uint8 (H, W, 3) picture."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError("cannot encode a picture as PNG")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def file_uri(path: Path) -> str:
    """A ``data:image/png`` URI of a PNG file."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def html_table(t: Any) -> str:
    """A rich :class:`~rich.table.Table` (as the terminal shows it) as an HTML table."""
    cols = list(t.columns)
    cells = [[str(c) for c in col.cells] for col in cols]
    head = "".join(f"<th>{esc(c.header)}</th>" for c in cols)
    body = []
    for i in range(len(cells[0]) if cells else 0):
        tds = "".join(
            f'<td class="{"num" if col.justify == "right" else ""}">{esc(cells[j][i])}</td>'
            for j, col in enumerate(cols)
        )
        body.append(f"<tr>{tds}</tr>")
    title = f"<caption>{esc(t.title)}</caption>" if t.title else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def legend_html(classes: Sequence[str], palette: Sequence[Sequence[int]]) -> str:
    """The gallery's legend: every class's colour, ignored pixels, the confidence scale."""
    items = [
        f'<li><span class="swatch" style="background:rgb({c[0]},{c[1]},{c[2]})"></span>'
        f"{i} {esc(name)}</li>"
        for i, (name, c) in enumerate(zip(classes, palette, strict=True))
    ]
    items.append(
        '<li><span class="swatch ignored"></span>255 ignored: dropped by the filter '
        "(pseudo-label) or not annotated (true label); never trained on</li>"
    )
    stops = ", ".join(f"rgb({r},{g},{b}) {100 * i / 8:.1f}%" for i, (r, g, b) in _stops())
    scale = (
        '<div class="scale"><span>confidence (the annotator\'s top probability): 0</span>'
        f'<span class="bar" style="background:linear-gradient(to right, {stops})"></span>'
        "<span>1</span></div>"
    )
    return f'<div class="legend" id="legend"><ul>{"".join(items)}</ul>{scale}</div>'


def _stops() -> list[tuple[int, tuple[int, int, int]]]:
    lut = _viridis()
    return [(i, tuple(int(v) for v in lut[min(255, i * 32)])) for i in range(9)]


@dataclass
class Entry:
    """One gallery row: an image's pictures (title, RGB uint8) and a caption."""

    image_id: str
    caption: str
    panels: list[tuple[str, np.ndarray]]


def gallery_html(entries: list[Entry]) -> str:
    rows = []
    for n, e in enumerate(entries, start=1):
        figs = "".join(
            f'<figure><img src="{png_uri(rgb)}" alt="{esc(title)} of {esc(e.image_id)}" '
            f"{_display_size(rgb)}><figcaption>{esc(title)}</figcaption></figure>"
            for title, rgb in e.panels
        )
        rows.append(
            f'<section class="entry"><h3>{n}. {esc(e.image_id)}</h3>'
            f'<p class="caption">{esc(e.caption)}</p><div class="panels">{figs}</div></section>'
        )
    return f'<div class="gallery">{"".join(rows)}</div>'


def _display_size(rgb: np.ndarray, most: int = 200) -> str:
    """``width=".." height=".."``: small pictures are shown enlarged by a whole factor
    (pixelated, so each pixel stays visible), as large as fits ``most`` CSS pixels."""
    h, w = rgb.shape[:2]
    f = max(1, most // max(h, w))
    return f'width="{w * f}" height="{h * f}"'


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 78rem;
       padding: 0 1rem; color: #1a1a1a; line-height: 1.4; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.25rem; margin-top: 2rem;
       border-bottom: 1px solid #ccc; } h3 { font-size: 1rem; margin: 0.2rem 0; }
nav a { margin-right: 1rem; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots img { max-width: 100%; margin: 0.5rem 1rem 0.5rem 0; border: 1px solid #eee; }
.legend { position: sticky; top: 0; background: #fff; padding: 0.5rem 0; z-index: 1;
          border-bottom: 1px solid #ddd; }
.legend ul { list-style: none; padding: 0; margin: 0; display: flex; flex-wrap: wrap;
             gap: 0.3rem 1.2rem; }
.swatch { display: inline-block; width: 1rem; height: 1rem; border: 1px solid #555;
          vertical-align: middle; margin-right: 0.35rem; }
.swatch.ignored { background-color: #fff; background-size: 8px 8px;
  background-image: linear-gradient(45deg, #b0b0b0 25%, transparent 25%, transparent 75%,
    #b0b0b0 75%), linear-gradient(45deg, #b0b0b0 25%, transparent 25%, transparent 75%,
    #b0b0b0 75%); background-position: 0 0, 4px 4px; }
.scale { display: flex; align-items: center; gap: 0.5rem; margin-top: 0.4rem;
         font-size: 0.9rem; }
.scale .bar { display: inline-block; width: 12rem; height: 0.8rem; border: 1px solid #555; }
.entry { margin: 1rem 0; }
.caption { margin: 0 0 0.3rem; color: #444; font-size: 0.9rem; }
.panels { display: flex; flex-wrap: wrap; gap: 0.5rem; }
figure { margin: 0; } figure img { display: block; image-rendering: pixelated;
  border: 1px solid #ddd; } figcaption { font-size: 0.8rem; color: #444; }
.note { color: #444; }
"""


def page(title: str, intro: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole page: a title, an introduction (HTML), and sections (anchor, heading, HTML)."""
    nav = " ".join(f'<a href="#{a}">{esc(h)}</a>' for a, h, _ in sections)
    body = "".join(f'<h2 id="{a}">{esc(h)}</h2>{content}' for a, h, content in sections)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{esc(title)}</h1>{intro}<nav>{nav}</nav>{body}</body></html>\n"
    )


def write_report(
    path: Path,
    title: str,
    intro: str,
    tables: list[Any],
    plots: str,
    gallery: str,
    plots_heading: str = "Plots",
) -> Path:
    """report.html: a title, an introduction, the rich ``tables``, then the plots' and the
    gallery's HTML, each in its own section."""
    sections = [
        ("summary", "Summary", "".join(html_table(t) for t in tables)),
        ("plots", plots_heading, plots),
        ("gallery", "Gallery", gallery),
    ]
    write(path, page(title, intro, sections))
    return path


def gallery_section(
    note: str, classes: Sequence[str], palette: Sequence[Sequence[int]], entries: list[Entry]
) -> str:
    """A note on what the gallery shows, its legend, and its entries."""
    return (
        f'<p class="note">{esc(note)}</p>' + legend_html(classes, palette) + gallery_html(entries)
    )


def write(path: Path, text: str) -> None:
    """Write the page atomically, leaving a file that already holds these bytes alone."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)


# -- which images, in which order ---------------------------------------------------------------
def kept_error(pseudo: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """(kept pixels, wrong kept pixels) of a pseudo-label against the truth, both uint8 (H, W);
    pixels whose truth is 255 are not counted."""
    kept = (pseudo != IGNORE_INDEX) & (truth != IGNORE_INDEX)
    return int(kept.sum()), int((kept & (pseudo != truth)).sum())


def rank(
    ids: list[str],
    kept_fraction: dict[str, float],
    errors: dict[str, tuple[int, int]],
) -> list[str]:
    """Ids worst first: highest error of the kept pixels where the truth is known (``errors``:
    kept and wrong pixels), then images without truth by lowest kept fraction; ties by id."""

    def key(i: str) -> tuple:
        kept, wrong = errors.get(i, (0, 0))
        err = wrong / kept if kept else -1.0  # no truth, or nothing kept: after the known ones
        return (-err, kept_fraction.get(i, 1.0), i)

    return sorted(ids, key=key)


def sample(ids: list[str], limit: int = RANK_LIMIT) -> list[str]:
    """At most ``limit`` ids, evenly spaced over the sorted list (all when fewer)."""
    ids = sorted(ids)
    if len(ids) <= limit:
        return ids
    step = len(ids) / limit
    return [ids[int(j * step)] for j in range(limit)]


def truth_of(manifest: Manifest, row: Row) -> np.ndarray | None:
    """The true label of a row (uint8 (H, W)), None when it has none or it cannot be read."""
    if row.label is None:
        return None
    try:
        return manifest.read_label(row)
    except Exception:  # noqa: BLE001 (a report shows what it can; validate names the file)
        return None


def pseudo_errors(folder: Path, manifest: Manifest, ids: list[str]) -> dict[str, tuple[int, int]]:
    """(kept, wrong) pixels of ``folder``'s PNG of every id whose row has a true label."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: str) -> tuple[str, tuple[int, int] | None]:
        truth = truth_of(manifest, manifest.row(i))
        path = id_path(folder, i)
        if truth is None or not path.is_file():
            return i, None
        pseudo = read_label_png(path)
        return i, kept_error(pseudo, truth) if pseudo.shape == truth.shape else None

    with ThreadPoolExecutor(max_workers=4) as pool:
        return {i: e for i, e in pool.map(one, ids) if e is not None}


def image_panels(
    manifest: Manifest, cache: Any, image_id: str, pseudo: list[tuple[str, np.ndarray]]
) -> tuple[list[tuple[str, np.ndarray]], np.ndarray | None]:
    """The gallery pictures of one image: image, true label (if any), raw argmax, the given
    pseudo-labels (title, uint8 (H, W)) and the confidence map; also the truth."""
    row = manifest.row(image_id)
    probs = cache.probs(image_id)
    truth = truth_of(manifest, row)

    def lab(a: np.ndarray) -> np.ndarray:  # shrink first, so the ignored pattern stays sharp
        return label_rgb(thumbnail(a, nearest=True), manifest.palette)

    panels = [("image", thumbnail(manifest.read_image(row), nearest=False))]
    if truth is not None:
        panels.append(("true label", lab(truth)))
    panels.append(("raw argmax", lab(probs.argmax(axis=0).astype(np.uint8))))
    panels += [(t, lab(p)) for t, p in pseudo]
    panels.append(("confidence", thumbnail(confidence_rgb(probs.max(axis=0)), nearest=False)))
    return panels, truth
