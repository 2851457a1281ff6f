"""The fault tests' shared workload: a deployment, a message stream, the checks.

:func:`run_workload` has four senders stream messages to four recipients
through both gateways (private messages, or each pair's group), injects one
fault in the middle, then checks with :func:`tests.faults.checker.check`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from imfast.auth import mint_token
from imfast.config import Settings
from tests.faults.checker import ChatClient, Figures, check
from tests.helpers.cluster import JWT_SECRET, Cluster

__all__ = ["PER_SENDER", "SETTINGS", "Run", "assert_clean", "run_workload"]

SETTINGS = Settings(jwt_secret=JWT_SECRET)
PER_SENDER = 30


@dataclass
class Run:
    """What a workload run saw, for scenario-specific checks after :func:`check`."""

    figures: Figures
    acks: dict[str, list[dict[str, Any]]]  # recipient -> `sent` frames addressed to it
    groups: dict[str, str] = field(default_factory=dict)  # recipient -> group conv
    seconds: float = 0.0  # from the first send to the last acknowledgement
    refused: int = 0  # send attempts answered with an error (`unavailable`), then resent
    timeouts: int = 0  # send attempts without an answer in 3 s, then resent


async def run_workload(cluster: Cluster, tag: str, fault: Callable[[], Awaitable[None]], *,
                       per_sender: int = PER_SENDER, pace: float = 0.02,
                       fault_at: float = 0.3, groups: bool = False,
                       offline_members: bool = False) -> Run:
    """Stream ``4 x per_sender`` messages, one every ``pace`` s per sender, fault at ``fault_at``.

    ``groups``: sender i and recipient i share group ``<tag>g<i>`` (entries go
    through Kafka ``group_msg``); ``offline_members`` adds ``<tag>o<i>``, who
    never connects (entries also go to ``offline_msg``).
    """
    urls = [cluster.url(0), cluster.url(1)]
    senders = [ChatClient(urls, mint_token(SETTINGS, f"{tag}s{i}"), f"{tag}s{i}")
               for i in range(4)]
    recipients = {f"{tag}r{i}": ChatClient(urls, mint_token(SETTINGS, f"{tag}r{i}"),
                                           f"{tag}r{i}") for i in range(4)}
    for c in [*senders, *recipients.values()]:
        await c.connect()
    acks: dict[str, list[dict[str, Any]]] = {u: [] for u in recipients}
    convs: dict[str, str] = {}
    if groups:
        for i, sender in enumerate(senders):
            members = [f"{tag}r{i}"] + ([f"{tag}o{i}"] if offline_members else [])
            reply = await sender.request({"type": "group_create", "group": f"{tag}g{i}",
                                          "members": members})
            assert reply["type"] == "group", reply
            convs[f"{tag}r{i}"] = f"g:{tag}g{i}"

    async def stream(i: int) -> None:
        to = f"{tag}r{i}"
        group = f"{tag}g{i}" if groups else None
        for n in range(per_sender):
            acks[to].append(await senders[i].send(to, f"{tag}-{i}-{n}", f"{i}:{n}",
                                                  group=group))
            await asyncio.sleep(pace)

    async def inject() -> None:
        await asyncio.sleep(fault_at)
        await fault()

    loop = asyncio.get_running_loop()
    began = loop.time()
    streams = asyncio.gather(*(stream(i) for i in range(4)))
    await asyncio.gather(streams, inject())
    seconds = loop.time() - began
    figures = await check(acks, recipients, sent=4 * per_sender)
    print("\n" + figures.line(tag))
    for c in [*senders, *recipients.values()]:
        await c.close()
    # The bodies arrived as sent, once each.
    for i, (user, frames) in enumerate(sorted(acks.items())):
        seen = recipients[user].bodies
        assert sorted(seen[(a["conv"], a["seq"])] for a in frames) == \
            sorted(f"{i}:{n}" for n in range(per_sender))
    return Run(figures, acks, convs, seconds, sum(c.refused for c in senders),
               sum(c.timeouts for c in senders))


def assert_clean(f: Figures) -> None:
    """Every message acknowledged, delivered once and stored once; order kept."""
    assert f.acknowledged == f.sent, f
    assert f.lost == 0 and f.order_violations == 0 and f.duplicated == 0, f
    assert f.delivered == f.acknowledged and f.stored == f.acknowledged, f
