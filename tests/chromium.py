"""Render a local HTML page in headless Chromium and report what happened, with no third-party
packages: the DevTools protocol over ``--remote-debugging-pipe`` (NUL-terminated JSON on fds 3/4).

    page = render(Path("report.html"), ready="document.body.dataset.rendered")
    page.requests        # every URL the page asked for (must be file: / data: / blob: only)
    page.errors          # console errors, uncaught exceptions and failed loads
    page.value           # the ``ready`` expression's value once truthy (None on timeout)
    page.evaluate(js)    # not available after return: pass ``probe`` to evaluate before closing
    page.screenshot      # PNG bytes

``png_pixels`` decodes an 8-bit RGB/RGBA PNG with zlib so tests can count non-background pixels.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--disable-extensions",
         "--disable-default-apps", "--mute-audio", "--hide-scrollbars")


def require_chromium() -> str:
    """Chromium's path; skips the test when absent, unless LSDB_REQUIRE_CHROMIUM=1 (then fails)."""
    import pytest

    path = find_chromium()
    if path is None:
        if os.environ.get("LSDB_REQUIRE_CHROMIUM") == "1":
            pytest.fail("LSDB_REQUIRE_CHROMIUM=1 but no Chromium found (apt-get install chromium)")
        pytest.skip("no Chromium on this machine")
    return path


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class Page:
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    value: object = None
    probe: object = None
    screenshot: bytes = b""


class _Pipe:
    def __init__(self, proc, write_fd: int, read_fd: int):
        self.proc, self.w, self.r = proc, write_fd, read_fd
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def _read_one(self, deadline: float) -> dict:
        import select

        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from Chromium")
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 20.0):
        mid = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_one(deadline)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read_one(deadline))
        except TimeoutError:
            pass


def render(path: Path, ready: str = "true", probe: str | None = None, timeout: float = 30.0,
           width: int = 1200, height: int = 1600, binary: str | None = None) -> Page:
    """Open ``path`` (a local file), wait until JS ``ready`` is truthy, collect requests/errors,
    evaluate ``probe`` (JSON-returning JS expression), take a full-page-width screenshot."""
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium found")
    profile = tempfile.mkdtemp(prefix="lsdb-chromium-")
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def child_fds():  # Chromium reads commands on fd 3 and writes replies on fd 4
        os.dup2(to_chrome_r, 3)
        os.dup2(from_chrome_w, 4)

    proc = subprocess.Popen(
        [binary, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}", f"--window-size={width},{height}",
         "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        close_fds=False, preexec_fn=child_fds)  # close_fds would run after preexec_fn and close 3/4
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    pipe = _Pipe(proc, to_chrome_w, from_chrome_r)
    page = Page()
    try:
        target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            pipe.call(f"{domain}.enable", session=sid)
        pipe.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=sid)
        pipe.call("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=sid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = pipe.call("Runtime.evaluate", {"expression": ready, "returnByValue": True}, session=sid)
            value = res.get("result", {}).get("value")
            if value:
                page.value = value
                break
            pipe.drain(0.2)
        pipe.drain(0.3)
        if probe:
            res = pipe.call("Runtime.evaluate", {"expression": probe, "returnByValue": True}, session=sid)
            page.probe = res.get("result", {}).get("value")
        shot = pipe.call("Page.captureScreenshot", {"format": "png"}, session=sid)
        import base64

        page.screenshot = base64.b64decode(shot["data"])
        _collect(pipe.events, page)
        try:
            pipe.send("Browser.close")
        except OSError:
            pass
    finally:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        shutil.rmtree(profile, ignore_errors=True)
    return page


def _collect(events: list[dict], page: Page) -> None:
    for ev in events:
        method, p = ev.get("method"), ev.get("params", {})
        if method == "Network.requestWillBeSent":
            page.requests.append(p["request"]["url"])
        elif method == "Network.loadingFailed":
            page.errors.append(f"load failed: {p.get('errorText')}")
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            page.errors.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            page.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            page.errors.append(f"log: {p['entry'].get('text')}")


def external_requests(page: Page) -> list[str]:
    return [u for u in page.requests if not u.startswith(("file:", "data:", "blob:", "about:"))]


# ------------------------------------------------------------------------------- PNG
def png_pixels(data: bytes):
    """Decode a non-interlaced 8-bit RGB or RGBA PNG → (width, height, channels, bytes of rows)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, "unsupported PNG layout"
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    out = bytearray(height * stride)
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - channels] if x >= channels else 0
            b = prev[x]
            c = prev[x - channels] if x >= channels else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out[y * stride:(y + 1) * stride] = line
        prev = line
    return width, height, channels, bytes(out)


def ink_fraction(png: bytes) -> float:
    """Fraction of pixels that differ from the most common colour (the background)."""
    import numpy as np

    w, h, ch, raw = png_pixels(png)
    px = np.frombuffer(raw, dtype=np.uint8).reshape(h * w, ch)[:, :3]
    keys = (px[:, 0].astype(np.uint32) << 16) | (px[:, 1].astype(np.uint32) << 8) | px[:, 2]
    values, counts = np.unique(keys, return_counts=True)
    return float(1 - counts.max() / len(keys))


# ------------------------------------------------------------------------------- Vega text
#: JS for ``render(probe=...)``: per ``.chart`` element, what Vega drew as SVG: the marks, the axis
#: titles of each view (a concat cell, else the whole chart), the legend labels, and the drawn
#: width against the width of the element around the chart.
VEGA_TEXT_PROBE = """Array.from(document.querySelectorAll('.chart')).map(div => {
  const views = new Map();
  div.querySelectorAll('.role-axis-title text').forEach(t => {
    const view = t.closest('.role-scope') || div;
    if (!views.has(view)) views.set(view, []);
    views.get(view).push(t.textContent);
  });
  const svg = div.querySelector('svg');
  return {marks: div.querySelectorAll('.role-mark path, .role-mark text, .role-mark line').length,
          views: Array.from(views.values()),
          legend: Array.from(div.querySelectorAll('.role-legend-label text')).map(t => t.textContent),
          width: svg ? svg.getBoundingClientRect().width : 0,
          room: div.parentElement.clientWidth};
})"""

# a float printed raw (0.30000000000000004) or a long run of digits (an unformatted id or count)
RAW_NUMBER = re.compile(r"\d\.\d{6,}|\d{7,}")


def repeated_titles(titles: list[str]) -> list[str]:
    """Titles that appear twice in one view, or a title that repeats a part of itself (Vega-Lite
    joins the different titles of layers sharing an axis with ', ')."""
    parts = [p for t in titles for p in t.split(", ")]
    return sorted({p for p in parts if parts.count(p) > 1})


def vega_text_problems(chart: dict) -> list[str]:
    """What reads badly in one chart of ``VEGA_TEXT_PROBE``'s answer; [] when nothing does."""
    problems = [f"axis title repeated in a view: {r!r}" for view in chart["views"] for r in repeated_titles(view)]
    problems += [f"unformatted legend label {label!r}" for label in chart["legend"] if RAW_NUMBER.search(label)]
    return problems
