"""``MESSAGE_RETENTION_DAYS`` on ``imfast serve`` (one process and ``--workers``): old
entries leave the node's own store, sequence numbers go on, devices resume from
the oldest entry kept."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import pytest

from imfast.backends.base import StoredMessage
from imfast.backends.sqlite import SQLiteStore
from tests.e2e.test_workers import Served

DAY_MS = 24 * 3600 * 1000


async def _an_old_node(path: Path) -> None:
    """alice wrote to bob 40 days ago (seqs 1-3) and yesterday (seq 4)."""
    now = int(time.time() * 1000)
    store = SQLiteStore(str(path))
    await store.append([
        StoredMessage("p:alice:bob", seq, f"m{seq}", "alice", "phone", f"c{seq}", f"old {seq}",
                      now - (40 if seq < 4 else 1) * DAY_MS) for seq in (1, 2, 3, 4)])
    await store.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_serve_deletes_entries_older_than_the_retention_at_start_and_goes_on(
        tmp_path: Path, workers: int) -> None:
    (tmp_path / "data").mkdir()
    asyncio.run(_an_old_node(tmp_path / "data" / "imfast.db"))
    served = Served(tmp_path, workers, MESSAGE_RETENTION_DAYS="30")
    try:
        served.wait_for(lambda s: s["messages_purged"] == 3)
        with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/metrics", timeout=5) as r:
            assert "im_messages_purged_total 3.0" in r.read().decode()
        # bob never acknowledged anything: he resumes from the oldest entry kept.
        bob = served.client("bob")  # reads up to "resumed"
        assert [(f["seq"], f["body"]) for f in bob.frames if f["type"] == "msg"] == \
            [(4, "old 4")]
        # The conversation's next entry follows the deleted ones.
        alice = served.client("alice")
        alice.send(type="send", cmid="new", to="bob", body="today")
        assert alice.recv_until("sent")[-1]["seq"] == 5
        assert bob.recv_until("msg")[-1]["body"] == "today"
    finally:
        served.stop()
    log = (tmp_path / "serve.log").read_text()
    assert "message retention on" in log and "messages purged rows=3" in log
