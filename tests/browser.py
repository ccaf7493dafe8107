"""Render a local, self-contained HTML file in headless Chromium and report what a reader would see.

Test helper only (Debian's ``chromium`` package; ``make test`` installs it). No pip dependencies
beyond numpy/matplotlib, which the runtime lock already has.

    from browser import render, requires_chromium

    @requires_chromium
    def test_report(tmp_path):
        got = render(tmp_path / "report.html", out_dir=tmp_path)
        assert got["text_chars"] > 0 and all(i["loaded"] for i in got["images"])

Two Chromium runs per call, side by side, each with its own throw-away profile:

* ``--dump-dom`` on a temp copy of the page with a probe ``<script>`` added before ``</body>``; on
  ``window.load`` (every ``<img>`` has loaded or failed by then) it writes a JSON summary into
  ``<pre id="__probe">``, which is read back from the dumped DOM;
* ``--screenshot`` of the original, unmodified file at ``width`` x ``height``.
"""

from __future__ import annotations

import html as html_lib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM_PACKAGE = "chromium"
SKIP_REASON = "Debian package chromium is not installed (make test installs it)"

# Any channel below this (0..1 scale) makes a pixel "not near-white".
NEAR_WHITE = 0.94

_PROBE_ID = "__probe"
_PROBE_SCRIPT = """<script>
window.addEventListener("load", function () {
  var body = document.body;
  var textChars = body ? body.innerText.length : 0;
  var images = Array.prototype.map.call(document.images, function (img, i) {
    return {index: i, alt: img.getAttribute("alt") || "", src_prefix: (img.getAttribute("src") || "").slice(0, 64),
            complete: img.complete, natural_width: img.naturalWidth, natural_height: img.naturalHeight,
            loaded: img.complete && img.naturalWidth > 0};
  });
  var out = {text_chars: textChars, title: document.title, images: images, js_errors: window.__probeErrors || []};
  var pre = document.createElement("pre");
  pre.id = "%s";
  pre.textContent = JSON.stringify(out);
  (body || document.documentElement).appendChild(pre);
});
</script>""" % _PROBE_ID
# Installed as early as possible so that errors thrown by the page's own scripts are counted.
_ERROR_HOOK = (
    "<script>window.__probeErrors=[];window.addEventListener('error',function(e){"
    "window.__probeErrors.push(String(e.message||(e.target&&e.target.tagName)||e));});</script>"
)

_BASE_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--allow-file-access-from-files",
    "--hide-scrollbars",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--force-device-scale-factor=1",
)


class BrowserError(RuntimeError):
    """Chromium failed, timed out, or produced no probe output."""


def chromium_path() -> str | None:
    """The Chromium executable (``$MEDMERGE_CHROMIUM``, else ``chromium`` on PATH, else /usr/bin/chromium)."""
    for candidate in (os.environ.get("MEDMERGE_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


requires_chromium = pytest.mark.skipif(chromium_path() is None, reason=SKIP_REASON)


def skip_unless_chromium() -> str:
    """Call inside a test: skips it (with SKIP_REASON) when Chromium is absent, else returns its path."""
    path = chromium_path()
    if path is None:
        pytest.skip(SKIP_REASON)
    return path


def _with_probe(source: str, base_href: str) -> str:
    """The page with an error hook + <base> after <head> (or at the top) and the probe before </body>."""
    head_extra = _ERROR_HOOK
    if not re.search(r"<base[\s>]", source, re.I):
        head_extra = f'<base href="{html_lib.escape(base_href)}">' + head_extra
    m = re.search(r"<head[^>]*>", source, re.I)
    if m:
        source = source[: m.end()] + head_extra + source[m.end() :]
    else:
        # No <head>: put the hook after the doctype / <html> tag so we do not trigger quirks mode.
        m = re.search(r"<html[^>]*>", source, re.I) or re.search(r"<!doctype[^>]*>", source, re.I)
        at = m.end() if m else 0
        source = source[:at] + head_extra + source[at:]
    idx = source.lower().rfind("</body>")
    if idx < 0:
        return source + _PROBE_SCRIPT
    return source[:idx] + _PROBE_SCRIPT + source[idx:]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as err:
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
        )


def _finish(proc: subprocess.Popen, timeout_s: float, what: str, log: Path) -> bytes:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the browser's own children too (own session)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise BrowserError(f"chromium {what} timed out after {timeout_s}s") from None
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise BrowserError(f"chromium {what} exited with {proc.returncode}:\n{tail}")
    return out


def nonwhite_fraction(png: Path, threshold: float = NEAR_WHITE) -> float:
    """Share of pixels with any RGB channel below ``threshold`` (0..1), alpha composited on white."""
    import matplotlib.image as mpimg
    import numpy as np

    img = np.asarray(mpimg.imread(str(png)), dtype=np.float64)
    if img.dtype.kind in "ui" or img.max() > 1.0:
        img = img / 255.0
    if img.ndim == 2:
        img = img[..., None]
    rgb = img[..., :3]
    if img.shape[-1] == 4:
        alpha = img[..., 3:4]
        rgb = rgb * alpha + (1.0 - alpha)
    if rgb.size == 0:
        return 0.0
    return float((rgb < threshold).any(axis=-1).mean())


def render(
    html: Path,
    *,
    width: int = 1280,
    height: int = 2000,
    timeout_s: float = 60,
    out_dir: Path | None = None,
) -> dict:
    """Load ``html`` in headless Chromium; return what loaded and how it looks.

    Returns ``{"text_chars": len(document.body.innerText), "title": str,
    "images": [{"index", "alt", "src_prefix", "complete", "natural_width", "natural_height", "loaded"}],
    "js_errors": [str], "screenshot": Path (PNG, width x height), "nonwhite_fraction": float}``.
    ``loaded`` is ``complete and natural_width > 0`` (a broken image is ``complete`` with width 0).
    The screenshot goes to ``out_dir`` (default: a fresh temp folder that is kept).
    Raises ``BrowserError`` when Chromium fails or times out, ``FileNotFoundError`` for a missing page,
    and skips the calling test when Chromium is not installed.
    """
    exe = skip_unless_chromium()
    html = Path(html).resolve()
    if not html.is_file():
        raise FileNotFoundError(html)
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="medmerge-render-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    screenshot = out_dir / f"{html.stem}.png"
    screenshot.unlink(missing_ok=True)

    with tempfile.TemporaryDirectory(prefix="medmerge-chromium-", ignore_cleanup_errors=True) as tmp:
        tmp = Path(tmp)
        probed = tmp / "page" / html.name
        probed.parent.mkdir()
        source = html.read_text(encoding="utf-8", errors="replace")
        probed.write_text(_with_probe(source, html.parent.as_uri() + "/"), encoding="utf-8")

        dom_cmd = [exe, *_BASE_FLAGS, f"--user-data-dir={tmp / 'profile-dom'}", f"--window-size={width},{height}",
                   "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()]
        shot_cmd = [exe, *_BASE_FLAGS, f"--user-data-dir={tmp / 'profile-shot'}", f"--window-size={width},{height}",
                    "--virtual-time-budget=10000", f"--screenshot={screenshot}", html.as_uri()]
        deadline = time.monotonic() + timeout_s
        procs = {}
        try:
            procs["--dump-dom"] = (_start(dom_cmd, tmp / "dom.log"), tmp / "dom.log")
            procs["--screenshot"] = (_start(shot_cmd, tmp / "shot.log"), tmp / "shot.log")
        finally:
            outputs, errors = {}, []
            for what, (proc, log) in procs.items():  # always reap both, even if one failed
                try:
                    outputs[what] = _finish(proc, max(1.0, deadline - time.monotonic()), what, log)
                except BrowserError as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]
        dom = outputs["--dump-dom"]

    text = dom.decode("utf-8", errors="replace")
    found = re.findall(rf'<pre id="{_PROBE_ID}">(.*?)</pre>', text, re.S)
    if not found:
        raise BrowserError(f"probe output missing from the dumped DOM of {html} (did the load event fire?)")
    probe = json.loads(html_lib.unescape(found[-1]))  # ours is appended last
    if not screenshot.is_file():
        raise BrowserError(f"chromium wrote no screenshot for {html}")
    probe["screenshot"] = screenshot
    probe["nonwhite_fraction"] = nonwhite_fraction(screenshot)
    return probe
