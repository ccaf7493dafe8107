"""The headless-Chromium probe (tests/browser.py) must be able to fail: broken images, blank pages."""

import base64
import io

import pytest

from browser import SKIP_REASON, chromium_path, nonwhite_fraction, render, requires_chromium

pytestmark = [requires_chromium, pytest.mark.slow]  # every test starts headless Chromium


def _png_data_uri() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2), dpi=80)
    ax.plot([0, 1, 2, 3], [0, 1, 4, 9], linewidth=3)
    ax.set_facecolor("#c0d0ff")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _page(body: str) -> str:
    return f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>t</title></head><body>{body}</body></html>\n"


def test_skip_reason_names_the_package():
    assert "chromium" in SKIP_REASON and chromium_path() is not None


def test_valid_image_and_text(tmp_path):
    html = tmp_path / "ok.html"
    html.write_text(_page(f"<h1>Merge report</h1><p>Accuracy 0.81</p><img alt='curve' src='{_png_data_uri()}'>"))
    got = render(html, width=800, height=600, out_dir=tmp_path)
    assert got["text_chars"] > 0
    assert len(got["images"]) == 1
    img = got["images"][0]
    assert img["alt"] == "curve" and img["complete"] and img["loaded"]
    assert (img["natural_width"], img["natural_height"]) == (240, 160)
    assert got["screenshot"].is_file() and got["screenshot"].parent == tmp_path
    assert got["nonwhite_fraction"] > 0.01  # the light-blue plot area alone is ~7% of 800x600
    assert got["js_errors"] == []


def test_broken_image_is_reported(tmp_path):
    html = tmp_path / "broken.html"
    good = _png_data_uri()
    html.write_text(_page(f"<p>two figures</p><img alt='fine' src='{good}'>"
                          "<img alt='broken' src='data:image/png;base64,iVBORw0KGgoAAAAbroken'>"))
    got = render(html, width=800, height=600, out_dir=tmp_path)
    fine, broken = got["images"]
    assert fine["loaded"] and fine["natural_width"] == 240
    assert broken["alt"] == "broken" and broken["index"] == 1
    assert broken["natural_width"] == 0 and broken["natural_height"] == 0
    assert not broken["loaded"]
    assert not all(i["loaded"] for i in got["images"])


def test_blank_page(tmp_path):
    html = tmp_path / "blank.html"
    html.write_text(_page(""))
    got = render(html, width=800, height=600, out_dir=tmp_path)
    assert got["text_chars"] == 0
    assert got["images"] == []
    assert got["nonwhite_fraction"] == pytest.approx(0.0, abs=1e-4)


def test_script_errors_and_hidden_text(tmp_path):
    # text made invisible by CSS is not innerText; a throwing page script is recorded
    html = tmp_path / "hidden.html"
    html.write_text(_page("<p style='display:none'>secret</p><script>undefined_fn()</script>"))
    got = render(html, width=400, height=300, out_dir=tmp_path)
    assert got["text_chars"] == 0
    assert any("undefined_fn" in e for e in got["js_errors"])
    assert nonwhite_fraction(got["screenshot"]) == got["nonwhite_fraction"] < 1e-4


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        render(tmp_path / "nope.html")
