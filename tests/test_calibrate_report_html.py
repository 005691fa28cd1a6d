"""report.html of ``calibrate run`` and ``calibrate evaluate``: self-contained, worst images
first, a legend, and it opens in a real headless Chromium without errors.

The browser test needs Debian's ``chromium`` package (``.ci/run`` installs it); where it is
absent and cannot be installed here, that test is skipped with one line. The other tests read
the file itself.
"""

from __future__ import annotations

import html as html_lib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _calibrate_fixtures import make_dataset
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from calibrate import html_report as H
from calibrate import report
from calibrate.cli import app
from data_manifest.io import read_label_png
from data_manifest.manifest import IGNORE_INDEX

runner = CliRunner()
# what the browser needs on this kind of machine: no sandbox as root, no GPU, and no background
# connections (the network is closed)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dataset whose unlabeled images have true labels, a cp and a risk run, an evaluation."""
    root = tmp_path_factory.mktemp("report")
    m, c = make_dataset(
        root / "ds", n_unlabeled=14, h=40, w=56, smooth=4, unlabeled_labels=True, topk=2
    )
    out = {"manifest": m, "cache": c}
    for method in ("cp", "risk"):
        args = ["run", "--manifest", str(m), "--cache", str(c), "--out-dir", str(root / method)]
        r = runner.invoke(app, [*args, "--method", method, "--risk", "0.3", "--workers", "1"])
        assert r.exit_code == 0, r.output
        out[method] = root / method
        out[f"{method}_output"] = r.stdout  # type: ignore[assignment]
    r = runner.invoke(
        app, ["evaluate", str(root / "cp"), str(root / "risk"), "--out", str(root / "ev")]
    )
    assert r.exit_code == 0, r.output
    out["ev"] = root / "ev"
    out["ev_output"] = r.stdout  # type: ignore[assignment]
    return out


def _entries(text: str) -> list[str]:
    return re.findall(r'<section class="entry"><h3>\d+\. (.*?)</h3>', text)


def test_run_writes_a_self_contained_report_and_links_it_last(runs) -> None:
    path = runs["cp"] / "report.html"
    text = path.read_text(encoding="utf-8")
    last = runs["cp_output"].strip().splitlines()[-1]
    assert last == f"report: {path.resolve().as_uri()}"
    # self-contained: every picture is inline, nothing is fetched
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in text and "http://" not in text and "https://" not in text
    # the summary tables, the four plots, the legend with every class and ignored pixels
    assert "<caption>calibration</caption>" in text and "coverage per class" in text
    for plot in ("coverage_vs_alpha", "per_class_coverage", "kept_fraction", "overlays"):
        assert f'alt="{plot}"' in text
    for i, name in enumerate(["background", "cat", "dog", "tree"]):
        assert f"{i} {name}</li>" in text
    assert "255 ignored" in text and "confidence" in text


def test_gallery_is_worst_first_by_the_error_of_the_kept_pixels(runs) -> None:
    """The order is recomputed here from the PNGs and the true labels."""
    from data_manifest import load

    m = load(runs["manifest"])
    errors = {}
    for row in m.split("unlabeled"):
        pseudo = read_label_png(runs["cp"] / f"{row.id}.png")
        truth = m.read_label(row)
        kept = (pseudo != IGNORE_INDEX) & (truth != IGNORE_INDEX)
        errors[row.id] = (kept & (pseudo != truth)).sum() / kept.sum()
    expected = sorted(errors, key=lambda i: (-errors[i], i))[:12]
    text = (runs["cp"] / "report.html").read_text(encoding="utf-8")
    assert [html_lib.unescape(e) for e in _entries(text)] == expected
    first = expected[0]
    assert f"error of the kept pixels against the true label: {100 * errors[first]:.1f} %" in text
    # each entry: image, true label, raw argmax, pseudo-label, confidence
    titles = re.findall(r"<figcaption>(.*?)</figcaption>", text)[:5]
    assert titles == ["image", "true label", "raw argmax", "pseudo-label (cp)", "confidence"]


def test_ignored_pixels_are_drawn_as_a_pattern_not_as_a_class_colour() -> None:
    lab = np.array([[0, 255, 255, 1]] * 8, np.uint8)
    rgb = H.label_rgb(lab, [[255, 255, 255], [9, 9, 9]])  # class 0 is white here
    ign = rgb[lab == IGNORE_INDEX]
    assert {tuple(v) for v in ign} == {H.IGNORED_LIGHT, H.IGNORED_DARK}
    assert {tuple(v) for v in rgb[lab == 0]} == {(255, 255, 255)}


def test_risk_summary_reports_what_its_pngs_use_and_stays_narrow(runs) -> None:
    """Method risk: q̂ is not called "used by the PNGs", the set figures do not show CP's kept
    fraction, and no table is wider than 100 characters (in a log, where nothing wraps)."""
    out = runs["risk_output"]
    assert "used by the PNGs)" not in out.split("q̂ (CP's, for the figures; the PNGs use τ")[0]
    assert "q̂ (CP's, for the figures; the PNGs use τ, below)" in out
    assert "kept fraction (CP rule)" not in out
    assert "risk control: kept pixels" in out
    fig = json.loads((runs["risk"] / "calibration.json").read_text())
    assert fig["qhat_used_by_pngs"] == "none: the risk-controlled threshold risk.tau"
    console = Console(width=10_000, record=True, soft_wrap=True)
    for t in report.summary_tables(fig):
        console.print(t)
    widest = max(len(line) for line in console.export_text().splitlines())
    assert widest <= 100, widest


def test_per_class_coverage_legend_hides_no_bar(runs) -> None:
    """The legend's box, as drawn, overlaps neither the axes nor any bar."""
    import matplotlib

    matplotlib.use("Agg")
    fig = json.loads((runs["cp"] / "calibration.json").read_text())
    f = report.per_class_figure(fig)
    f.canvas.draw()
    ax = f.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert not legend.overlaps(ax.get_window_extent())
    assert ax.patches and not any(legend.overlaps(b.get_window_extent()) for b in ax.patches)


def test_overlays_have_a_truth_column_and_a_legend(runs) -> None:
    """overlays.png: per image, image | true label | raw argmax | pseudo-label, and a legend
    with every class and ignored pixels; the file is the figure drawn (same pixel size)."""
    import matplotlib

    matplotlib.use("Agg")
    from annotate import open_cache
    from data_manifest import load

    fig = json.loads((runs["cp"] / "calibration.json").read_text())
    ids = sorted(fig["pngs"])[:3]
    f = report.overlays_figure(
        runs["cp"], "cp", ids, load(runs["manifest"]), open_cache(runs["cache"])
    )
    titles = [ax.get_title() for ax in f.axes if ax.images]
    assert titles == [
        t for i in ids for t in (f"{i}: image", "true label", "raw argmax", "pseudo-label (cp)")
    ]
    labels = [t.get_text() for t in f.legends[0].get_texts()]
    assert labels == ["0 background", "1 cat", "2 dog", "3 tree", "255 ignored (grey checks)"]
    assert "ignored pixels" in f._suptitle.get_text()


def test_evaluate_writes_a_report_with_every_folder(runs) -> None:
    path = runs["ev"] / "report.html"
    text = path.read_text(encoding="utf-8")
    assert runs["ev_output"].strip().splitlines()[-1] == f"report: {path.resolve().as_uri()}"
    assert 'alt="risk-coverage"' in text and 'id="legend"' in text
    titles = re.findall(r"<figcaption>(.*?)</figcaption>", text)[:6]
    assert titles == ["image", "true label", "raw argmax", "cp", "risk", "confidence"]
    assert len(_entries(text)) == 12


# -- a real browser ------------------------------------------------------------------------------
def chromium() -> str:
    """The Chromium binary; installed from Debian's packages when missing and possible, else
    the test is skipped with one line."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"],
            env=env,
            capture_output=True,
            check=False,
        )
        found = shutil.which("chromium")
    if not found:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return found


# Run in the browser after load: every image decoded, the legend visible, errors collected.
PROBE = """<script>
window.addEventListener("error", e => { document.title = "ERROR " + e.message; });
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;
  const legend = document.getElementById("legend");
  const box = legend ? legend.getBoundingClientRect() : {width: 0, height: 0};
  const swatches = legend ? legend.querySelectorAll(".swatch").length : 0;
  const entries = document.querySelectorAll(".gallery .entry").length;
  const top = Math.round(document.getElementById("gallery").getBoundingClientRect().top);
  if (!document.title.startsWith("ERROR"))
    document.title = `CHECKED images=${imgs.length} broken=${broken} entries=${entries} ` +
      `legend=${Math.round(box.width)}x${Math.round(box.height)} swatches=${swatches} ` +
      `gallery=${top} height=${document.documentElement.scrollHeight}`;
});
</script>"""


def _browse(binary: str, url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", *args, url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def probe(binary: str, page: Path, tmp: Path) -> dict[str, str]:
    """Open a copy of ``page`` with :data:`PROBE` added; returns what the probe found."""
    copy = tmp / "probe.html"
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"))
    dom = _browse(binary, copy.as_uri(), tmp, "--dump-dom", "--window-size=1280,1000").stdout
    title = re.search(r"<title>(.*?)</title>", dom)
    assert title, dom[:500]
    assert title.group(1).startswith("CHECKED"), title.group(1)
    return dict(kv.split("=") for kv in title.group(1).split()[1:])


def screenshot_gallery(
    binary: str, page: Path, out: Path, tmp: Path, height: int = 1400
) -> subprocess.CompletedProcess:
    """A PNG of the page as it is, from its gallery down ``height`` pixels, 1280 wide: the
    whole page is drawn (headless Chromium draws nothing when asked to scroll to an anchor),
    then cut at the gallery's top."""
    found = probe(binary, page, tmp)
    full = tmp / "full.png"
    done = _browse(
        binary, page.as_uri(), tmp, "--enable-logging=stderr", "--v=0",
        f"--screenshot={full}", f"--window-size=1280,{found['height']}",
    )  # fmt: skip
    top = int(found["gallery"])
    Image.open(full).crop((0, top, 1280, top + height)).save(out, optimize=True)
    return done


@pytest.mark.slow
def test_report_opens_in_headless_chromium(runs, tmp_path: Path) -> None:
    binary = chromium()
    page = runs["cp"] / "report.html"
    found = probe(binary, page, tmp_path)
    n_img = len(re.findall(r"<img ", page.read_text(encoding="utf-8")))
    assert found["images"] == str(n_img) and found["broken"] == "0", found
    assert found["entries"] == "12" and found["swatches"] == "5", found
    w, h = (int(v) for v in found["legend"].split("x"))
    assert w > 300 and h > 20, found
    # the page as it is: no console errors; its gallery drawn with the legend's colours
    shot = tmp_path / "gallery.png"
    done = screenshot_gallery(binary, page, shot, tmp_path)
    console = [ln for ln in done.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    im = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    for colour in ([200, 0, 0], [0, 200, 0], [0, 0, 200]):  # cat, dog, tree
        assert (np.abs(im.astype(int) - colour).sum(-1) < 10).any(), colour
    assert (im == H.IGNORED_DARK).all(-1).any()  # ignored pixels' pattern (legend, labels)
