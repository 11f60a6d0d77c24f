"""Open a local HTML page in headless Chromium and report what happened, over CDP.

Debian's ``chromium`` is driven through the Chrome DevTools Protocol with the
``websocket-client`` package: the page is loaded from a file:// URL in a fresh
profile, and every network request, console message and uncaught exception is
collected, along with the size of every image once the page has loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-default-apps", "--disable-extensions", "--mute-audio",
    "--remote-debugging-port=0", "--window-size=1400,1000",
]  # fmt: skip

IMAGES_JS = """JSON.stringify(Array.from(document.images).map(img => {
  const r = img.getBoundingClientRect();
  return {complete: img.complete, natural_w: img.naturalWidth, natural_h: img.naturalHeight,
          w: r.width, h: r.height, src: img.src.slice(0, 30)};
}))"""


@dataclass
class PageVisit:
    """What loading one page did."""

    requests: list[str] = field(default_factory=list)  # every URL requested
    console_errors: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    text: str = ""  # document.body.innerText
    loaded: bool = False


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _Cdp:
    def __init__(self, ws_url: str):
        import websocket  # websocket-client

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float) -> bool:
        if any(e.get("method") == method for e in self.events):
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            msg = json.loads(self.ws.recv())
            self.events.append(msg)
            if msg.get("method") == method:
                return True
        return False

    def close(self) -> None:
        self.ws.close()


def visit(page: Path, timeout: float = 60) -> PageVisit:
    """Load ``page`` in a fresh headless Chromium and collect what happened."""
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("chromium not found (Debian package 'chromium')")
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    proc = subprocess.Popen(
        [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(profile)},
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        cdp = _Cdp(ws_url)
        try:
            for domain in ("Page", "Network", "Runtime", "Log"):
                cdp.call(f"{domain}.enable")
            cdp.events.clear()
            cdp.call("Page.navigate", url=page.resolve().as_uri())
            out = PageVisit(loaded=cdp.wait_for("Page.loadEventFired", timeout))
            time.sleep(0.5)  # late requests or console messages after the load event
            result = cdp.call("Runtime.evaluate", expression=IMAGES_JS, returnByValue=True)
            out.images = json.loads(result["result"]["value"])
            result = cdp.call(
                "Runtime.evaluate", expression="document.body.innerText", returnByValue=True
            )
            out.text = result["result"]["value"]
            for e in cdp.events:
                method, p = e.get("method"), e.get("params", {})
                if method == "Network.requestWillBeSent":
                    out.requests.append(p["request"]["url"])
                elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                    out.console_errors.append(json.dumps(p.get("args"))[:300])
                elif method == "Runtime.exceptionThrown":
                    out.console_errors.append(json.dumps(p.get("exceptionDetails"))[:300])
                elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
                    out.console_errors.append(p["entry"].get("text", "")[:300])
            return out
        finally:
            cdp.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
