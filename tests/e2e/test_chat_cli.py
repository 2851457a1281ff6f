"""`imfast chat` as a subprocess: the one-shot --send mode and the interactive client."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.harness.services import free_port
from tests.helpers.node import Client, NodeThread

REPO = Path(__file__).resolve().parents[2]


def chat(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    # `imfast chat -- ARGS`: the `--` keeps `imfast`'s own parser off chat's options.
    return subprocess.run([sys.executable, "-m", "imfast", "chat", "--", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)


def connect(node: NodeThread, user: str) -> Client:
    c = Client(node.url, node.token(user))
    c.welcome()
    return c


class Terminal:
    """An interactive `imfast chat` with its stdin and stdout on pipes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imfast", "chat", "--", *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        """The first new output line containing ``text``."""
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r}; output: {self.seen}") from None
            self.seen.append(line)
            if text in line:
                return line

    def quit(self) -> int:
        self.type("/quit")
        return self.proc.wait(10)


def test_send_prints_the_ack_as_json_and_the_recipient_gets_it(node: NodeThread) -> None:
    bob = connect(node, "bob")
    done = chat("--url", node.url, "--token", node.token("alice"), "--send", "bob",
                "deploy check: hello bob")
    assert done.returncode == 0, done.stderr
    ack = json.loads(done.stdout)
    assert (ack["type"], ack["conv"], ack["seq"], ack["duplicate"]) == \
        ("sent", "p:alice:bob", 1, False)
    assert ack["cmid"] and ack["msg_id"]
    msg = bob.recv()
    assert (msg["type"], msg["from"], msg["body"], msg["msg_id"]) == \
        ("msg", "alice", "deploy check: hello bob", ack["msg_id"])


def test_send_to_a_group_with_a_dev_token_from_the_data_dir(make_node: Any) -> None:
    node = make_node(jwt_secret="")  # the node keeps its dev secret in its data dir
    bob = connect(node, "bob")
    bob.send(type="group_create", group="ops", members=["alice"], id=1)
    bob.recv_until("group")
    done = chat("--url", node.url, "--user", "alice", "--data-dir", node.settings.data_dir,
                "--send", "g:ops", "all good")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["conv"] == "g:ops"
    msg = bob.recv_until("msg", body="all good")[-1]
    assert (msg["conv"], msg["from"]) == ("g:ops", "alice")


def test_send_failures_exit_non_zero_and_say_why(node: NodeThread, tmp_path: Path) -> None:
    bad = chat("--url", node.url, "--token", "not-a-token", "--send", "bob", "x")
    assert bad.returncode == 1 and "authentication failed (4500)" in bad.stderr
    assert bad.stdout == ""
    down = chat("--url", f"ws://127.0.0.1:{free_port()}/ws", "--token", node.token("alice"),
                "--send", "bob", "x")
    assert down.returncode == 1 and "cannot connect to ws://127.0.0.1:" in down.stderr
    refused = chat("--url", node.url, "--token", node.token("alice"), "--send", "g:nowhere",
                   "x")
    assert refused.returncode == 1 and "refused" in refused.stderr
    nobody = chat("--url", node.url, "--send", "bob", "x")
    assert nobody.returncode == 2 and "--token" in nobody.stderr
    no_secret = chat("--url", node.url, "--user", "alice", "--data-dir", str(tmp_path / "none"),
                     "--send", "bob", "x")
    assert no_secret.returncode == 2 and "no dev secret" in no_secret.stderr


def test_interactive_chat_shows_incoming_messages_and_sends_lines(node: NodeThread) -> None:
    term = Terminal("--url", node.url, "--token", node.token("alice"))
    try:
        term.wait_for("connected as alice")
        term.type("/to bob")
        term.wait_for("now talking to bob (p:alice:bob)")
        bob = connect(node, "bob")
        bob.send(type="send", cmid="b1", to="alice", body="hello alice")
        assert term.wait_for("bob: hello alice") == "[p:alice:bob #1] bob: hello alice"
        term.type("hi bob, from the terminal")
        term.wait_for("[p:alice:bob #2] (sent)")
        frames = bob.recv_until("msg", body="hi bob, from the terminal")
        # The message bob sent was on alice's screen: she has read it.
        receipts = [f for f in frames + bob.recv_until("receipt") if f["type"] == "receipt"]
        assert receipts[0]["user"] == "alice" and receipts[0]["seq"] == 1
        bob.send(type="typing", conv="p:alice:bob")
        term.wait_for("[p:alice:bob] bob is typing...")
        term.type("/history")
        term.wait_for("[p:alice:bob #2] alice: hi bob, from the terminal")
        assert term.quit() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_interactive_groups_with_dev_auth(make_node: Any) -> None:
    node = make_node(insecure_dev_auth=True)
    bob = connect(node, "bob")
    term = Terminal("--url", node.url, "--insecure-user", "carol")
    try:
        term.wait_for("connected as carol")
        term.type("/create team bob")
        term.wait_for("created team: bob, carol")
        term.type("hello team")
        term.wait_for("[g:team #2] (sent)")
        frames = bob.recv_until("msg", body="hello team")
        created = next(f for f in frames if f["type"] == "msg" and f["kind"] == "event")
        assert created["event"]["event"] == "created"
        bob.send(type="send", cmid="t1", group="team", body="hi carol")
        term.wait_for("[g:team #3] bob: hi carol")
        term.type("/members")
        term.wait_for("bob (member), carol (owner)")
        term.type("/nonsense")
        term.wait_for("unknown command")
        assert term.quit() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
