"""docs/protocol.md's wscat sessions, replayed against a real node."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.helpers.node import Client, NodeThread

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
CHECKED = ("type", "user", "cmid", "conv", "seq", "body", "from", "kind", "id", "conversations")


def sessions() -> list[list[tuple[str, str]]]:
    """Each ```console block as [(direction, text)] for lines starting '> ' or '< '."""
    blocks = re.findall(r"```console\n(.*?)```", DOC.read_text(), re.DOTALL)
    return [[(line[0], line[2:]) for line in b.splitlines() if line[:2] in ("> ", "< ")]
            for b in blocks]


def expected_fields(text: str) -> dict:
    try:
        frame = json.loads(text)
    except ValueError:  # abbreviated with "..." in the doc: compare what is spelled out
        frame = dict(re.findall(r'"(\w+)":("[^"]*"|\d+)', text))
        frame = {k: json.loads(v) for k, v in frame.items()}
    return {k: v for k, v in frame.items() if k in CHECKED}


def test_documented_sessions_behave_as_shown(node: NodeThread) -> None:
    alice_lines, bob_lines = sessions()
    clients = {"alice": Client(node.url, node.token("alice")), "bob": Client(node.url)}
    for who, lines in (("alice", alice_lines), ("bob", bob_lines)):
        c = clients[who]
        for direction, text in lines:
            if direction == ">":
                if '"auth"' in text:
                    text = json.dumps({"type": "auth", "token": node.token("bob")})
                c.ws.send(text)
            else:
                got = c.recv()
                want = expected_fields(text)
                assert {k: got.get(k) for k in want} == want, (who, text, got)
    assert len(alice_lines) >= 4 and len(bob_lines) >= 6
