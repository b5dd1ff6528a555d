"""A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (no websocket library).

Chromium reads JSON commands, each ended by a NUL byte, from file descriptor 3 and writes replies
and events the same way to descriptor 4. Used by tools/chat_page_check.py to drive the chat page.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time


class Browser:
    """Headless Chromium with one page attached (flat session)."""

    def __init__(self, url: str, width: int = 1100, height: int = 760, binary: str | None = None) -> None:
        exe = binary or shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            raise FileNotFoundError("chromium not found: install Debian's package (apt-get install chromium)")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        self._profile = tempfile.mkdtemp(prefix="cdp-profile-")
        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                f"--user-data-dir={self._profile}", f"--window-size={width},{height}", "--no-first-run",
                "--hide-scrollbars", "about:blank"]

        def fds() -> None:  # the child gets the pipe ends as 3 (commands in) and 4 (replies out)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]  # out of the way
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(args, preexec_fn=fds, close_fds=False,  # keep 3 and 4 (pipes are not inheritable)
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next, self._buf, self.session = 0, b"", None
        self.session = self._attach(url)
        self.call("Page.navigate", url=url)
        self.wait_for(f"document.readyState === 'complete' && location.href === {json.dumps(url)}")

    def _attach(self, url: str) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pages = [t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"]
            if pages:
                sid = self.call("Target.attachToTarget", targetId=pages[0]["targetId"], flatten=True)["sessionId"]
                return sid
            time.sleep(0.2)
        raise TimeoutError(f"no page target for {url}")

    def _read_message(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise ConnectionError("chromium closed the debugging pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, **params) -> dict:
        """Send one command (to the page session once attached) and wait for its reply."""
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read_message()
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str):
        """Evaluate JavaScript in the page (promises awaited); return its value."""
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error: {r['exceptionDetails'].get('text')} in {expression!r}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._try(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {expression!r}")
            time.sleep(0.1)

    def _try(self, expression: str):
        try:
            return self.js(expression)
        except RuntimeError:  # not there yet (the page is loading)
            return False

    def type(self, text: str) -> None:
        """Insert text at the focused element, as typing would."""
        self.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))

    def screenshot(self, path: str) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (ConnectionError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        shutil.rmtree(self._profile, ignore_errors=True)
