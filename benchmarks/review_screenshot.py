"""A screenshot of the capture review page (serving.gateway.review) in a real headless Chromium, for the README.

    python -m benchmarks.review_screenshot [--out benchmarks/results/review-page.png] [--family classic]

Fills a capture store with screens of a style family the router never trained on, as the gateway would have
captured them (sampled, low confidence, a shadow disagreement, flagged, caller feedback), serves the page over that
store on a free port, signs in with a session cookie, and has Chromium (Debian's `chromium` package, not a project
dependency: `apt-get install chromium`) render it, driven over its DevTools protocol.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from lora_router.capture import CaptureItem, CaptureStore
from lora_router.configuration import CommandError, check_types, parse_command, run_command
from lora_router.deployment import CaptureConfig
from lora_router.images import prepare_image
from serving.gateway.capture import Capturer
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.review import COOKIE, ReviewRoutes
from serving.launcher import free_port
from training.screens import generate

log = logging.getLogger(__name__)

LABELS = ("calendar", "claim-window", "provider-select")
# (screen, routed to, confidence, why captured, caller feedback, label): what a day of review might hold.
ITEMS = [("calendar", "calendar", 0.97, ["random"], None, None),
         ("claim-window", "calendar", 0.91, ["feedback"], {"correct": False, "expert": "claim-window"},
          "claim-window"),
         ("provider-select", "provider-select", 0.55, ["low_confidence"], None, None),
         ("claim-window", "provider-select", 0.62, ["disagreement", "low_confidence"], None, None),
         ("calendar", "claim-window", 0.88, ["flagged"], None, None),
         ("provider-select", "provider-select", 0.99, ["random"], None, "provider-select")]
_KEY = "screenshot-admin-key"


@dataclass
class ScreenshotArguments:
    """The flags of `python -m benchmarks.review_screenshot`."""

    out: Path = field(default=Path("benchmarks/results/review-page.png"), metadata={"help": "The PNG to write."})
    family: str = field(default="classic", metadata={"help": "Style family of the captured screens."})
    width: int = field(default=1400, metadata={"help": "Browser window width in pixels."})
    height: int = field(default=1000, metadata={"help": "Browser window height in pixels."})

    def __post_init__(self) -> None:
        check_types(self)


def fill(store: CaptureStore, family: str) -> None:
    for n, (kind, routed, confidence, reasons, feedback, label) in enumerate(ITEMS):
        png = prepare_image(generate(kind, 40 + n, family=family).image).png
        others = [k for k in LABELS if k != routed]
        probabilities = {routed: confidence, others[0]: round((1 - confidence) * 0.7, 3),
                         others[1]: round((1 - confidence) * 0.3, 3)}
        store.add(CaptureItem(id=f"req-{n:03d}", captured_at=time.time() - 600 * (len(ITEMS) - n),
                              router="router@3f2a9c01b7de", expert=routed, confidence=confidence,
                              probabilities=probabilities, fallback=None, reasons=reasons, size=len(png),
                              feedback=feedback, label=label), png)


async def shoot(args: ScreenshotArguments, folder: Path) -> bytes:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise CommandError("chromium is not installed (Debian: apt-get install chromium)")
    capture = Capturer(CaptureConfig(dir=str(folder)), folder, GatewayMetrics(), metric_label=str)
    review = ReviewRoutes(_KEY, capture, labels=lambda: LABELS)
    app = web.Application()
    review.add_to(app)
    runner = web.AppRunner(app)
    await runner.setup()
    port, devtools = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    browser = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                                f"--remote-debugging-port={devtools}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as session:
            page = await _page_target(session, devtools, browser)
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                call = _DevTools(ws)
                await call("Network.enable")
                await call("Network.setCookie", name=COOKIE, value=review.session_cookie(time.time()),
                           domain="127.0.0.1", path="/admin/review", httpOnly=True)
                await call("Emulation.setDeviceMetricsOverride", width=args.width, height=args.height,
                           deviceScaleFactor=1, mobile=False)
                await call("Page.enable")
                await call("Page.navigate", url=f"http://127.0.0.1:{port}/admin/review")
                await call.until("Page.loadEventFired")
                # The cards come from a fetch after the load event: wait until every image is decoded.
                script = (f"document.querySelectorAll('.card img').length === {len(ITEMS)} && "
                          "[...document.images].every(i => i.complete && i.naturalWidth > 0)")
                for _ in range(200):
                    done = await call("Runtime.evaluate", expression=script)
                    if done["result"].get("value"):
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise CommandError("the review page never showed its captures")
                shot = await call("Page.captureScreenshot", format="png")
                return base64.b64decode(shot["data"])
    finally:
        browser.terminate()
        browser.wait(timeout=10)
        await runner.cleanup()


async def _page_target(session: aiohttp.ClientSession, port: int, browser: subprocess.Popen) -> dict:
    """The browser's page, once its DevTools endpoint answers."""
    for _ in range(300):
        if browser.poll() is not None:
            raise CommandError(f"chromium exited with status {browser.returncode}")
        try:
            async with session.get(f"http://127.0.0.1:{port}/json") as r:
                return next(t for t in await r.json() if t["type"] == "page")
        except (aiohttp.ClientError, StopIteration):
            await asyncio.sleep(0.1)
    raise CommandError("chromium's DevTools endpoint never answered")


class _DevTools:
    """Calls over one DevTools websocket, answered in order; events seen meanwhile are kept for until()."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.sent, self.events = ws, 0, []

    async def __call__(self, method: str, **params) -> dict:
        self.sent += 1
        await self.ws.send_json({"id": self.sent, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=60)
            if message.get("id") == self.sent:
                if "error" in message:
                    raise CommandError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message.get("method"))

    async def until(self, event: str) -> None:
        while event not in self.events:
            self.events.append((await self.ws.receive_json(timeout=60)).get("method"))


def run(args: ScreenshotArguments) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "captures"
        fill(CaptureStore(folder, max_items=100, max_age_s=1e9, max_bytes=1 << 30), args.family)
        png = asyncio.run(shoot(args, folder))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(png)
    log.info("wrote %s", args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(ScreenshotArguments, argv, prog="python -m benchmarks.review_screenshot",
                            description=__doc__)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
