"""A Jepsen-style set checker for chat: every acknowledged message arrives exactly once.

:class:`ChatClient` is a deliberately plain client (picows, asyncio) that
does what a correct application does and nothing more: it reconnects to any
of several gateway URLs, resends an unacknowledged message with the *same*
cmid until it gets ``sent``, acknowledges what it receives, and drops
entries whose seq it has already seen in that conversation (the protocol's
rule for "exactly once as the client sees it").

:func:`check` compares what senders were told (``sent``) with what
recipients saw, and with a final full sync from the store, and returns the
figures the fault tests print: sent, acknowledged, delivered, duplicates
dropped (retransmits of a seq the client already had: allowed, at least once
on the wire), duplicated (one message under two seqs, in the store or as
delivered: never allowed), lost (acknowledged but never seen), and order
violations.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
from dataclasses import dataclass, field
from typing import Any

from picows import WSListener, WSMsgType, ws_connect

__all__ = ["ChatClient", "Figures", "check"]


class _Listener(WSListener):  # type: ignore[misc]
    def __init__(self, client: ChatClient) -> None:
        self.client = client

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            self.client._on_frame(json.loads(frame.get_payload_as_bytes()))
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()

    def on_ws_disconnected(self, transport: Any) -> None:
        self.client._on_disconnect(transport)


@dataclass
class ChatClient:
    """One user/device; see module docstring."""

    urls: list[str]
    token: str
    user: str
    received: dict[str, list[int]] = field(default_factory=dict)  # conv -> seqs accepted
    bodies: dict[tuple[str, int], str] = field(default_factory=dict)
    dropped: int = 0
    reconnects: int = 0
    refused: int = 0  # sends answered with an error (`unavailable`...), then resent
    timeouts: int = 0  # sends with no answer within 3 s (or cut by a disconnect), resent

    def __post_init__(self) -> None:
        self._transport: Any = None
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._connected = asyncio.Event()
        self._last_seen: dict[str, int] = {}
        self._closing = False
        self._reconnecting: asyncio.Task[None] | None = None
        self._requests = 0

    async def connect(self, deadline: float = 30.0) -> None:
        """Connect (trying every URL, with backoff) until welcomed."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        delay = 0.05
        while True:
            url = random.choice(self.urls)
            try:
                self._connected.clear()
                transport, _ = await ws_connect(lambda: _Listener(self),
                                                f"{url}?token={self.token}")
                self._transport = transport
                await asyncio.wait_for(self._connected.wait(), 5)
                return
            except Exception:
                if loop.time() > end:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _on_disconnect(self, transport: Any) -> None:
        if transport is self._transport:
            self._transport = None
            self._connected.clear()
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("disconnected"))
            if not self._closing:
                # A correct application reconnects at once (and then resumes).
                self.reconnects += 1
                self._reconnecting = asyncio.get_running_loop().create_task(self.connect())

    def _on_frame(self, frame: dict[str, Any]) -> None:
        ftype = frame.get("type")
        if ftype == "welcome":
            self._connected.set()
        elif ftype in ("sent", "error") and frame.get("cmid") in self._waiters:
            fut = self._waiters[frame["cmid"]]
            if not fut.done():
                fut.set_result(frame)
        elif "id" in frame and f"id:{frame['id']}" in self._waiters:
            fut = self._waiters[f"id:{frame['id']}"]
            if not fut.done():
                fut.set_result(frame)
        elif ftype == "msg":
            conv, seq = frame["conv"], frame["seq"]
            if seq <= self._last_seen.get(conv, 0):
                self.dropped += 1  # a retransmit: seen already
                return
            self._last_seen[conv] = seq
            self.received.setdefault(conv, []).append(seq)
            self.bodies[(conv, seq)] = frame.get("body", "")
            if self._transport is not None:
                self._transport.send(WSMsgType.TEXT, json.dumps(
                    {"type": "ack", "conv": conv, "seq": seq}).encode())

    async def send(self, to: str, cmid: str, body: str, deadline: float = 60.0,
                   group: str | None = None) -> dict[str, Any]:
        """Send until acknowledged (same cmid on every try); returns the `sent` frame.

        To a user (``to``), or to a group (``group``; ``to`` is then ignored).
        """
        target = {"group": group} if group is not None else {"to": to}
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while True:
            if self._transport is None or not self._connected.is_set():
                if self._reconnecting is not None and not self._reconnecting.done():
                    with contextlib.suppress(Exception):  # it failed: try ourselves below
                        await self._reconnecting
                if self._transport is None or not self._connected.is_set():
                    await self.connect(max(1.0, end - loop.time()))
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._waiters[cmid] = fut
            try:
                self._transport.send(WSMsgType.TEXT, json.dumps(
                    {"type": "send", "cmid": cmid, **target, "body": body}).encode())
                reply = await asyncio.wait_for(fut, 3.0)
                if reply["type"] == "sent":
                    return reply
                self.refused += 1
                await asyncio.sleep(0.2)  # `unavailable` and the like: retry the same cmid
            except Exception:
                self.timeouts += 1
                if loop.time() > end:
                    raise
                await asyncio.sleep(0.1)
            finally:
                self._waiters.pop(cmid, None)

    async def request(self, frame: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send a frame with a fresh ``id``; return the reply carrying that id (no retry)."""
        if self._transport is None or not self._connected.is_set():
            await self.connect()
        self._requests += 1
        rid = f"{self.user}-{self._requests}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[f"id:{rid}"] = fut
        try:
            self._transport.send(WSMsgType.TEXT, json.dumps({**frame, "id": rid}).encode())
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.pop(f"id:{rid}", None)

    async def sync_all(self, conv: str) -> list[dict[str, Any]]:
        """Every stored entry of ``conv`` (paged), for the final check."""
        out: list[dict[str, Any]] = []
        after = 0
        while True:
            if self._transport is None:
                await self.connect()
            got: list[dict[str, Any]] = []
            done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            previous = self._on_frame

            def capture(frame: dict[str, Any], got: list[dict[str, Any]] = got,
                        done: asyncio.Future[dict[str, Any]] = done, after: int = after,
                        previous: Any = previous) -> None:
                if frame.get("type") == "msg" and frame.get("conv") == conv and \
                        frame["seq"] > after:
                    got.append(frame)
                elif frame.get("type") == "synced" and not done.done():
                    done.set_result(frame)
                else:
                    previous(frame)

            self._on_frame = capture  # type: ignore[method-assign]
            try:
                self._transport.send(WSMsgType.TEXT, json.dumps(
                    {"type": "sync", "conv": conv, "after": after, "limit": 200}).encode())
                synced = await asyncio.wait_for(done, 10)
            finally:
                self._on_frame = previous  # type: ignore[method-assign]
            out.extend(got)
            if not synced["more"]:
                # A live push or retransmit of the same entry may arrive during the sync.
                return list({e["seq"]: e for e in out}.values())
            after = synced["last"]

    async def close(self) -> None:
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._transport is not None:
            self._transport.disconnect()


@dataclass
class Figures:
    sent: int = 0
    acknowledged: int = 0
    delivered: int = 0
    duplicates: int = 0
    duplicated: int = 0
    lost: int = 0
    stored: int = 0
    order_violations: int = 0
    converged: float = 0.0  # seconds from the last acknowledgement until all were delivered

    def line(self, scenario: str) -> str:
        return (f"{scenario}: sent={self.sent} acknowledged={self.acknowledged} "
                f"delivered={self.delivered} duplicates_dropped={self.duplicates} "
                f"duplicated={self.duplicated} "
                f"lost={self.lost} stored={self.stored} order_violations={self.order_violations} "
                f"converged_in={self.converged:.1f}s")


def _missing(acks: dict[str, list[dict[str, Any]]], recipients: dict[str, ChatClient]) -> int:
    """Acknowledged messages a recipient has not seen (yet)."""
    return sum(1 for user, frames in acks.items() for a in frames
               if a["seq"] not in recipients[user].received.get(a["conv"], ()))


async def check(acks: dict[str, list[dict[str, Any]]], recipients: dict[str, ChatClient],
                sent: int, settle: float = 3.0, deadline: float = 60.0) -> Figures:
    """Compare acknowledgements with deliveries and the store (see module docstring).

    ``acks`` maps recipient user -> the `sent` frames of messages addressed to it.
    Waits until every acknowledged message was delivered (or ``deadline``
    seconds passed: then the missing ones count as lost), then ``settle``
    seconds more for retransmits and duplicates to show up.
    """
    loop = asyncio.get_running_loop()
    began = loop.time()
    while _missing(acks, recipients) and loop.time() - began < deadline:
        await asyncio.sleep(0.1)
    converged = loop.time() - began
    await asyncio.sleep(settle)  # let retransmits and catch-ups arrive
    f = Figures(sent=sent, converged=converged)
    for user, frames in acks.items():
        client = recipients[user]
        f.acknowledged += len(frames)
        f.duplicates += client.dropped
        by_conv: dict[str, set[int]] = {}
        for a in frames:
            by_conv.setdefault(a["conv"], set()).add(a["seq"])
        for conv, seqs in by_conv.items():
            seen = client.received.get(conv, [])
            f.order_violations += sum(1 for x, y in itertools.pairwise(seen) if y <= x)
            f.delivered += len(seqs & set(seen))
            f.lost += len(seqs - set(seen))
            entries = await client.sync_all(conv)
            stored = {e["seq"] for e in entries}
            f.stored += len(seqs & stored)
            # One message under two seqs (bodies are unique per message in the workloads).
            bodies = [e.get("body") for e in entries if e.get("kind", "msg") == "msg"]
            f.duplicated += len(bodies) - len(set(bodies))
            seen_bodies = [b for q in seen if (b := client.bodies.get((conv, q)))]  # events: ""
            f.duplicated += len(seen_bodies) - len(set(seen_bodies))
    return f
