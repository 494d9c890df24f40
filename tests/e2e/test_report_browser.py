"""The report's HTML page as a reader sees it: rendered by a real headless Chromium.

Chromium comes from apt (`.ci/run` installs it where /usr/bin/chromium is missing). This test
is not skipped without it: a page nobody has looked at in a browser is not known to work.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from streamfeedback._tools.report import _cell_text_colour

from .test_cli import QUICKSTART, sf

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Appended to a copy of the page: after load, it writes what the reader would see into the
# DOM, which --dump-dom then prints.
_PROBE = """
<script>
addEventListener("load", () => {
  const images = [...document.images];
  const loaded = images.filter((i) => i.complete && i.naturalWidth > 0 && i.width > 100);
  const banner = document.getElementById("simulated");
  const box = banner ? banner.getBoundingClientRect() : null;
  const out = document.createElement("pre");
  out.id = "probe";
  const top = box ? Math.round(box.top) : -1;
  const height = box ? Math.round(box.height) : 0;
  out.textContent = `images=${images.length} loaded=${loaded.length} ` +
    `banner_top=${top} banner_height=${height}`;
  document.body.appendChild(out);
});
</script>
"""


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Chromium is needed: apt-get install -y chromium (.ci/run does this)"
    return found


def _browse(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    return subprocess.run(
        [
            _chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--window-size=1200,1600",
            *extra,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("report")
    out = where / "out.ndjson"
    run = sf("run", str(QUICKSTART), "-o", str(out), "-q")
    assert run.returncode == 0, run.stderr.decode()
    report = sf("report", str(out), "--html", str(where / "report.html"))
    assert report.returncode == 0, report.stderr.decode()
    return where / "report.html"


def test_the_report_renders_in_chromium_with_its_plots_and_the_simulated_banner(
    report_page: Path, tmp_path: Path
) -> None:
    from PIL import Image

    probed = tmp_path / "probed.html"
    probed.write_text(report_page.read_text().replace("</body>", _PROBE + "</body>"))
    dom = _browse(probed, tmp_path, "--virtual-time-budget=10000", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(
        r"images=(\d+) loaded=(\d+) banner_top=(-?\d+) banner_height=(\d+)", dom.stdout
    )
    assert found, dom.stdout[-2000:]
    images, loaded, banner_top, banner_height = map(int, found.groups())
    assert images >= 3 and loaded == images, "every plot decoded and laid out"
    assert 0 <= banner_top < 200 and banner_height > 20, "the banner is the first thing seen"

    shot = tmp_path / "shot.png"
    taken = _browse(report_page, tmp_path, f"--screenshot={shot}")
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
        width, height = rgb.size
        assert (width, height) == (1200, 1600)
        top = rgb.crop((0, 0, width, 200))
        assert top.getcolors(1 << 20) is not None
        banner = sum(
            n for n, (r, g, b) in top.getcolors(1 << 20) or [] if (r, g, b) == (255, 210, 63)
        )
        assert banner > 20_000, "the yellow simulated-run banner is drawn at the top"
        plots = rgb.crop((0, 400, width, height))
        colours = plots.getcolors(1 << 20) or []
        assert len(colours) > 200, "the plots were drawn (a blank page has a handful)"
        bars = sum(n for n, (r, g, b) in colours if (r, g, b) == (76, 114, 176))
        assert bars > 5_000, "the leaderboard's bars are on screen"


@pytest.mark.parametrize(
    ("value", "colour"), [(0.0, "white"), (0.5, "black"), (0.6, "black"), (1.0, "white")]
)
def test_heatmap_labels_are_white_on_dark_cells_and_black_on_light_ones(
    value: float, colour: str
) -> None:
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    image = ax.imshow([[0.0, 1.0]], cmap="RdBu", vmin=0, vmax=1)
    assert _cell_text_colour(image, value) == colour
