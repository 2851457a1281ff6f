"""wscat (npm) follows docs/protocol.md's example session, typed through a terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.browser.conftest import wscat_path
from tests.helpers.node import NodeThread

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
CHECKED = ("type", "user", "cmid", "conv", "seq", "body", "from", "kind", "id", "conversations")
ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")


def documented_sessions() -> list[list[tuple[str, str]]]:
    """Each ```console block of the doc as [(">" or "<", frame text)]."""
    blocks = re.findall(r"```console\n(.*?)```", DOC.read_text(), re.DOTALL)
    return [[(line[0], line[2:]) for line in b.splitlines() if line[:2] in ("> ", "< ")]
            for b in blocks]


def spelled_out(text: str) -> dict[str, Any]:
    """The fields a documented frame spells out (``...`` stands for the rest)."""
    try:
        frame = json.loads(text)
    except ValueError:
        frame = {k: json.loads(v) for k, v in re.findall(r'"(\w+)":("[^"]*"|\d+)', text)}
    return {k: v for k, v in frame.items() if k in CHECKED}


class Wscat:
    """``wscat -c URL`` on a pseudo-terminal, as a person would run it."""

    def __init__(self, url: str) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen([wscat_path(), "-c", url], stdin=slave, stdout=slave,
                                     stderr=slave, close_fds=True,
                                     env={**os.environ, "TERM": "dumb"})
        os.close(slave)
        self.fd = master
        self.buffer = b""
        self.received: list[dict[str, Any]] = []
        self.screen = b""
        end = time.monotonic() + 10
        while b"Connected" not in self.screen:  # a person waits for this before typing
            assert time.monotonic() < end, f"wscat did not connect; screen: {self.screen!r}"
            self._read()

    def _read(self) -> None:
        ready, _, _ = select.select([self.fd], [], [], 0.1)
        if not ready:
            assert self.proc.poll() is None, f"wscat exited; screen: {self.screen!r}"
            return
        chunk = os.read(self.fd, 65536)
        self.screen += chunk
        self.buffer += ANSI.sub(b"", chunk)
        *lines, self.buffer = re.split(rb"\r?\n", self.buffer)
        for line in lines:
            line = line.strip(b"\r").lstrip(b"> ").strip()
            if line.startswith(b"< "):
                self.received.append(json.loads(line[2:]))

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def next_frame(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next frame wscat printed as ``< {...}``."""
        end = time.monotonic() + timeout
        while not self.received:
            assert time.monotonic() < end, f"wscat printed no frame; screen: {self.screen!r}"
            self._read()
        return self.received.pop(0)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        os.close(self.fd)


def test_wscat_can_follow_the_documented_session(node: NodeThread) -> None:
    alice_lines, bob_lines = documented_sessions()
    assert any('"auth"' in text for _, text in bob_lines)
    for user, lines, url in (("alice", alice_lines, f"{node.url}?token={node.token('alice')}"),
                             ("bob", bob_lines, node.url)):
        wscat = Wscat(url)
        try:
            for direction, text in lines:
                if direction == ">":
                    if '"auth"' in text:
                        text = json.dumps({"type": "auth", "token": node.token("bob")})
                    wscat.type(text)
                else:
                    got = wscat.next_frame()
                    want = spelled_out(text)
                    assert {k: got.get(k) for k in want} == want, (user, text, got)
        finally:
            wscat.close()
