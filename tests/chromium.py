"""A headless Chromium for the report's browser test, driven over the DevTools protocol.

Why this and not selenium or a websocket client: ``--remote-debugging-pipe`` makes Chromium
read protocol messages from file descriptor 3 and write them to descriptor 4, each a JSON
object ended by a NUL byte, so the whole client is a pair of pipes and ``json`` (no extra
package, no port, no network). The browser runs in its own session (``setsid``) with a fresh
profile, and :meth:`Chromium.close` ends that process group: only what this module started.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-extensions", "--disable-default-apps", "--mute-audio",
    "--remote-debugging-pipe",
)
"""--no-sandbox: CI runs as root, where Chromium's sandbox refuses to start."""


def find_chromium() -> str | None:
    """The first Chromium-family browser on PATH, or None."""
    return next((path for name in BINARIES if (path := shutil.which(name))), None)


class BrowserError(RuntimeError):
    """The browser died, timed out or answered a command with an error."""


@dataclass
class Visit:
    """What a reader's browser saw on one page."""

    url: str
    seen: dict
    """What the page's script returned (see PROBE)."""
    errors: list[str] = field(default_factory=list)
    """Console errors, uncaught exceptions and failed loads, as the browser logged them."""


PROBE = """(async () => {
  await Promise.all([...document.images].map(i => i.decode().catch(() => null)));
  return {
    title: document.title,
    images: [...document.images].map(i => ({src: i.src.slice(0, 40), complete: i.complete,
                                             naturalWidth: i.naturalWidth})),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
    rows: [...document.querySelectorAll('tr.claim-row')].map(
      r => [r.dataset.claim, r.dataset.test, r.querySelectorAll('td').length - 1]),
    headings: [...document.querySelectorAll('h2[id]')].map(h => h.id),
    text: document.body.innerText,
  };
})()"""
"""Run in the loaded page: waits until every image is decoded, then reports what is there."""


class Chromium:
    """One headless browser process; use as a context manager."""

    def __init__(self, binary: str, profile: Path, timeout: float = 20.0) -> None:
        self.timeout = timeout
        self._next = 0
        self._buffer = b""
        self._events: list[dict] = []
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Move the browser's ends above 2..4 first, so dup2 onto 3 and 4 cannot clobber one.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser_r, from_browser_w)]
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)
        profile.mkdir(parents=True, exist_ok=True)
        self.log = profile / "chromium.log"
        actions = [
            (os.POSIX_SPAWN_DUP2, high[0], 3),
            (os.POSIX_SPAWN_DUP2, high[1], 4),
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(self.log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        argv = [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"]
        try:
            self.pid = os.posix_spawn(binary, argv, os.environ, file_actions=actions, setsid=True)
        finally:
            for fd in high:
                os.close(fd)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Ask the browser to quit, then end its process group (its renderers included)."""
        with contextlib.suppress(OSError):
            self._write({"id": -1, "method": "Browser.close"})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _write(self, message: dict) -> None:
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise BrowserError(f"no answer from the browser within {self.timeout} s "
                                   f"(log: {self.log})")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise BrowserError(f"the browser closed its pipe (log: {self.log}):\n"
                                   + self.log.read_text(errors="replace")[-2000:])
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """One command; its result (events that arrive meanwhile are kept for :meth:`wait`)."""
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._write(message)
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._events.append(reply)

    def wait(self, method: str, session: str) -> dict:
        """The first event ``method`` of ``session`` (kept or still to come)."""
        deadline = time.monotonic() + self.timeout
        while True:
            for i, ev in enumerate(self._events):
                if ev["method"] == method and ev.get("sessionId") == session:
                    return self._events.pop(i)
            reply = self._read(deadline)
            if "method" in reply:
                self._events.append(reply)

    def _errors(self, session: str) -> list[str]:
        out = []
        for ev in self._events:
            if ev.get("sessionId") != session:
                continue
            p = ev.get("params", {})
            if ev["method"] == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')}")
            elif ev["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                  for a in p.get("args", [])))
            elif ev["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
        return out

    def visit(self, url: str) -> Visit:
        """Open ``url`` in a fresh tab, wait for its load event and every image's decoding,
        and report what is on the page and every error the browser logged."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        try:
            for domain in ("Page", "Runtime", "Log"):
                self.send(f"{domain}.enable", session=session)
            nav = self.send("Page.navigate", {"url": url}, session=session)
            if nav.get("errorText"):
                raise BrowserError(f"{url}: {nav['errorText']}")
            self.wait("Page.loadEventFired", session)
            seen = self.send("Runtime.evaluate", {"expression": PROBE, "awaitPromise": True,
                                                  "returnByValue": True}, session=session)
            if "exceptionDetails" in seen:
                raise BrowserError(f"{url}: the probe failed: {seen['exceptionDetails']}")
            # Errors logged after load (a late failed resource) arrive before this answer.
            self.send("Runtime.evaluate", {"expression": "1"}, session=session)
            return Visit(url, seen["result"]["value"], self._errors(session))
        finally:
            self._events = [e for e in self._events if e.get("sessionId") != session]
            self.send("Target.closeTarget", {"targetId": target})
