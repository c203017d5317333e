"""The HTML report: self-contained (nothing fetched at view time), and every plot drawn when headless Chromium
opens it (its screenshot is checked)."""
import os
import re
import shutil
import subprocess

import pytest

from parity.cli import main

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Chromium and sets this, so the browser test runs there instead of being skipped
REQUIRED = os.environ.get("SD3PARITY_REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "report.html"
    code = main(["check", "--family", "sd3.5-medium", "--prompt", "wow!! a cat", "--steps", "2", "--mode", "both",
                 "--flag", "clip_g_tokenizer=hf", "--quiet", "--html", str(out)])
    assert code == 1
    return out


def test_the_page_is_self_contained(page):
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "a resource fetched at view time"
    sources = re.findall(r'<img [^>]*src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    n = int(re.search(r'data-plots="(\d+)"', html).group(1))
    assert n == len(sources) == 6  # MMDiT and text depth, latent per step, impl / reference / difference images
    for section in ("Error against depth", "Latent error per step", "Decoded images", "Tokens and padding",
                    "Records that differ", "Versions and sources"):
        assert section in html
    assert "prompt 0, clip-g: 77 ids, 5 positions differ" in html  # the '!' padding of CLIP-G (hf vs hf-bang-pad)
    assert "introduced at: " in html and "&#34;torch&#34;: &#34;2.13.0" in html


def _chromium(*args, cwd):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={cwd / 'profile'}"]
    return subprocess.run([BROWSER, *flags, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(BROWSER is None and not REQUIRED, reason="no Chromium (CI installs it)")
def test_every_plot_is_drawn_in_headless_chromium(page, tmp_path):
    import numpy as np
    from PIL import Image

    assert BROWSER is not None, "SD3PARITY_REQUIRE_BROWSER=1 but no chromium on PATH"
    dom = _chromium("--dump-dom", page.as_uri(), cwd=tmp_path).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    plots, drawn = (int(re.search(f'data-{k}="(\\d+)"', body).group(1)) for k in ("plots", "drawn"))
    assert drawn == plots == 6  # the page's script counts the images the browser decoded
    shot = tmp_path / "shot.png"
    _chromium("--window-size=1280,3200", f"--screenshot={shot}", page.as_uri(), cwd=tmp_path)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (3200, 1280)
    white = (pixels > 245).all(axis=-1).mean()
    assert white < 0.9, f"{white:.0%} of the screenshot is white"
    c0 = (np.abs(pixels - [31, 119, 180]).sum(axis=-1) < 30).sum()  # matplotlib's first line colour
    assert c0 > 200, "no plotted line in the screenshot"
    red = (np.abs(pixels - [255, 215, 210]).sum(axis=-1) < 12).sum()  # the shaded differing token cells
    assert red > 500
