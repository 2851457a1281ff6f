"""etcd Registry: where each online device is connected, shared by all gateways.

Layout (CONTRACT.md; operators read it with ``etcdctl get /registry/users/<user_id> --prefix``)::

    /registry/users/<user_id>/<device_id>  ->  <gateway_address>

Guarantees:

* Every entry this process writes is attached to ONE lease of this process,
  kept alive in the background; :meth:`EtcdRegistry.close` revokes it, so a
  gateway's entries vanish at once on shutdown and within ``lease_ttl``
  seconds after a crash.  If the lease is lost anyway (etcd unreachable for
  longer than the TTL), a new one is granted and everything this process
  still holds is registered again - unless another gateway took the device
  over meanwhile.
* ``register``/``unregister`` calls arriving within ``batch_window`` (10 ms)
  go out as ONE etcd transaction (at most ``max_batch`` operations; a key
  appears once per transaction); the coroutine returns once its batch is
  written.  ``unregister`` is a compare-and-delete: the entry is removed only
  while it still points at the given gateway.
* Calls on one key that are still queued, not yet taken into a transaction,
  make one operation: the newest call decides what it is (a register puts;
  an unregister is the compare-and-delete alone, which leaves alone a
  registration another gateway wrote meanwhile, where a put-then-delete
  would have erased it).  So while etcd is down the queue holds at most one
  unwritten operation per key, however often devices connect and leave.
* ``lookup`` answers from a local cache kept by a watch on
  ``/registry/users/`` (initial range read, then watch from the next
  revision: no event is missed).  A write of this process is in its own cache
  when the write returns (read-your-writes); other gateways' writes arrive
  through the watch, typically within milliseconds.
* etcd down: writes stay queued and are retried with backoff (``register``
  returns after ``write_timeout`` with a warning, its entry still queued);
  lookups keep answering from the cache; the watch reconnects, re-reads the
  prefix and watches again, trying the endpoints in turn.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aetcd
from aetcd import rpc
from aetcd import transactions as tx
from aetcd.exceptions import ClientError, _handle_exception

from imfast.backends.errors import BackendUnavailable

__all__ = ["PREFIX", "EtcdRegistry", "registry_key"]

log = logging.getLogger("imfast.backends.etcd")

PREFIX = "/registry/users/"
_PREFIX_B = PREFIX.encode()

# gRPC: notice a dead peer and reconnect quickly (defaults back off up to 120 s).
_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.initial_reconnect_backoff_ms": 100,
    # gRPC also gives each connection attempt at least this long (its minimum
    # connect timeout): at 100 ms a briefly busy etcd failed start-up (4 in 120
    # starts with etcd paused 0.25-0.6 s; none at 2 s).  Retries still begin
    # 100 ms after a refused attempt (initial backoff).
    "grpc.min_reconnect_backoff_ms": 2_000,
    "grpc.max_reconnect_backoff_ms": 1_000,
}

_PUT, _DELETE_IF, _REPUT = "put", "delete_if", "reput"


def registry_key(user: str, device: str) -> str:
    """``/registry/users/<user>/<device>``."""
    return f"{PREFIX}{user}/{device}"


def _split_key(key: str) -> tuple[str, str] | None:
    rest = key[len(PREFIX):]
    user, sep, device = rest.partition("/")
    return (user, device) if sep and user and device else None


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    address = endpoint.split("://", 1)[-1].rstrip("/")
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, 2379
    return host.strip("[]"), int(port)


@dataclass(eq=False)
class _Op:
    kind: str
    key: str
    gateway: str
    future: asyncio.Future[None] = field(repr=False)
    taken: bool = False  # in the transaction being written: its kind must not change


class EtcdRegistry:
    """:class:`~imfast.backends.base.Registry` on etcd (see the module docstring)."""

    def __init__(
        self,
        endpoints: list[str],
        *,
        lease_ttl: int = 10,
        owner: str = "",
        batch_window: float = 0.010,
        max_batch: int = 128,
        rpc_timeout: float = 3.0,
        write_timeout: float = 5.0,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints = [_parse_endpoint(e) for e in endpoints]
        self.lease_ttl = max(2, int(lease_ttl))
        self.owner = owner
        self.batch_window = batch_window
        self.max_batch = max(1, min(max_batch, 128))  # etcd's default --max-txn-ops is 128
        self.rpc_timeout = rpc_timeout
        self.write_timeout = write_timeout

        #: Transactions written by the batcher (each carries up to max_batch calls).
        self.txn_count = 0
        #: Register/unregister operations written.
        self.ops_written = 0
        #: Leases granted (1 after start; more if one was lost).
        self.lease_grants = 0
        #: Times the watch was (re)established after a range read.
        self.watch_syncs = 0
        self.lease_id: int | None = None

        self._endpoint_index = 0
        self._client: aetcd.Client | None = None
        # Cache: user -> {device: gateway}; revisions guard against stale updates.
        self._cache: dict[str, dict[str, str]] = {}
        self._rev: dict[str, int] = {}  # key -> mod revision of the cached value
        self._tomb: dict[str, int] = {}  # key -> delete revision not yet seen by the watch
        self._watch_rev = 0
        self._watch_live = False
        self._unreachable = False  # the last resync attempt failed
        # What this process registered: key -> (gateway, revision written or 0).
        self._mine: dict[str, tuple[str, int]] = {}
        self._queue: deque[_Op] = deque()
        self._unsent: dict[str, _Op] = {}  # key -> its queued op no transaction took yet
        #: Register/unregister calls folded into an op of the same key still queued.
        self.ops_folded = 0
        self._wakeup = asyncio.Event()
        self._lease_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._started = False

    # ------------------------------------------------------------------ state

    @property
    def watch_live(self) -> bool:
        """True while the cache is fed by a live watch."""
        return self._watch_live

    @property
    def pending(self) -> int:
        """Writes queued but not yet written (e.g. while etcd is down)."""
        return len(self._queue)

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect, grant this process's lease, read the prefix and start the watch."""
        if self._started:
            return
        self._new_client()
        try:
            await self._grant_lease()
            watch = await self._sync()
        except (TimeoutError, ClientError, OSError) as exc:
            await self._close_client()
            host, port = self.endpoints[self._endpoint_index]
            raise BackendUnavailable("etcd", f"{host}:{port}: {exc or type(exc).__name__}") from exc
        self._started = True
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch_loop(watch), name="etcd-registry-watch"),
            loop.create_task(self._keepalive_loop(), name="etcd-registry-keepalive"),
            loop.create_task(self._writer_loop(), name="etcd-registry-writer"),
        ]

    async def close(self) -> None:
        """Stop the background tasks and revoke the lease: this process's entries vanish."""
        if self._closing:
            return
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._unsent.clear()
        while self._queue:
            op = self._queue.popleft()
            if not op.future.done():
                op.future.set_result(None)
        if self._client is not None and self.lease_id is not None:
            try:
                await asyncio.wait_for(self._client.revoke_lease(self.lease_id), self.rpc_timeout)
            except (TimeoutError, ClientError, OSError) as exc:
                log.warning("etcd lease revoke failed owner=%s lease=%x: %s (entries expire in %ss)",
                            self.owner, self.lease_id, exc, self.lease_ttl)
        self._watch_live = False
        await self._close_client()

    # ---------------------------------------------------------------- Registry

    async def register(self, user: str, device: str, gateway: str) -> None:
        key = registry_key(user, device)
        self._mine[key] = (gateway, 0)
        await self._submit(_PUT, key, gateway)

    async def unregister(self, user: str, device: str, gateway: str) -> None:
        key = registry_key(user, device)
        mine = self._mine.get(key)
        if mine is not None and mine[0] == gateway:
            del self._mine[key]
        await self._submit(_DELETE_IF, key, gateway)

    async def lookup(self, user: str) -> dict[str, str]:
        if self._watch_live or self._unreachable or self._client is None:
            return self.cached_lookup(user)
        # The watch broke a moment ago: read etcd directly, else answer from the cache.
        try:
            prefix = f"{PREFIX}{user}/".encode()
            resp = await asyncio.wait_for(self._client.get_prefix(prefix), self.rpc_timeout)
        except (TimeoutError, ClientError, OSError):
            return self.cached_lookup(user)
        return {
            kv.key.decode()[len(prefix):]: kv.value.decode()
            for kv in resp.kvs
            if b"/" not in kv.key[len(prefix):]
        }

    async def refresh(self, user: str) -> None:
        """Read ``user``'s registrations from etcd into the cache now (not via the watch).

        Used before a device's resume: once this returns, every entry routed
        from here finds a registration that was written before the call, so an
        entry either reaches the device by push or is already stored for the
        resume to read.  Revision-guarded like the watch, so it never puts back
        something older than what the cache knows; best effort when etcd is
        out of reach (the cache stays as it is).
        """
        if self._client is None or self._unreachable:
            return
        prefix = f"{PREFIX}{user}/".encode()
        try:
            resp = await asyncio.wait_for(self._client.get_prefix(prefix), self.rpc_timeout)
        except (TimeoutError, ClientError, OSError):
            return
        for kv in resp.kvs:
            if b"/" not in kv.key[len(prefix):]:
                self._apply(kv.key.decode(), kv.value.decode(), kv.mod_revision)

    def cached_lookup(self, user: str) -> dict[str, str]:
        """device -> gateway from the local cache only (no I/O; for hot paths)."""
        return dict(self._cache.get(user, ()))

    # --------------------------------------------------------------- writes

    async def _submit(self, kind: str, key: str, gateway: str) -> None:
        if not self._started or self._closing:
            raise RuntimeError("EtcdRegistry is not running (call start())")
        unsent = self._unsent.get(key)
        if unsent is not None and unsent.gateway == gateway:
            unsent.kind = kind  # the newest call decides (module docstring); both wait for it
            self.ops_folded += 1
            fut = unsent.future
        else:
            fut = asyncio.get_running_loop().create_future()
            self._enqueue(_Op(kind, key, gateway, fut))
        done, _ = await asyncio.wait({fut}, timeout=self.write_timeout)
        if fut in done:
            fut.result()
        else:
            log.warning("etcd registry write still queued after %.1fs owner=%s key=%s "
                        "(etcd unreachable? retrying in background)",
                        self.write_timeout, self.owner, key)

    def _enqueue(self, op: _Op) -> None:
        self._queue.append(op)
        self._unsent[op.key] = op
        self._wakeup.set()

    def _release(self, batch: list[_Op]) -> None:
        """A transaction failed: its ops, queued still, may be folded into again until
        the next one takes them.  One whose key got a newer op meanwhile (while it was
        in flight) leaves the queue: whether or not etcd applied it, the newest call
        decides what the key ends as, and the caller of this one waits for that."""
        unsent = self._unsent
        for op in batch:
            op.taken = False
            newer = unsent.get(op.key)
            if newer is None:
                unsent[op.key] = op
            elif newer.gateway == op.gateway:
                self._queue.remove(op)
                newer.future.add_done_callback(partial(_settle_like, op.future))

    def _take_batch(self) -> list[_Op]:
        batch: list[_Op] = []
        keys: set[str] = set()
        unsent = self._unsent
        for op in self._queue:
            if len(batch) >= self.max_batch or op.key in keys:
                break  # etcd refuses a key twice in one txn: the rest goes next
            batch.append(op)
            keys.add(op.key)
            op.taken = True  # its kind is fixed now: _write reads the answer by it
            if unsent.get(op.key) is op:
                del unsent[op.key]
        return batch

    def _build_ops(self, batch: list[_Op], lease: int) -> list[Any]:
        ops: list[Any] = []
        for op in batch:
            kb, vb = op.key.encode(), op.gateway.encode()
            if op.kind == _PUT:
                ops.append(tx.Put(kb, vb, lease))
            elif op.kind == _DELETE_IF:
                ops.append(tx.Txn([tx.Value(kb) == vb], [tx.Delete(kb)], []))
            else:  # _REPUT: only where the entry is gone or still ours
                still_ours = tx.Txn([tx.Value(kb) == vb], [tx.Put(kb, vb, lease)], [])
                ops.append(tx.Txn([tx.Version(kb) == 0], [tx.Put(kb, vb, lease)], [still_ours]))
        return ops

    async def _writer_loop(self) -> None:
        delay = 0.05
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                # Collect everything that arrives within the batch window.
                await asyncio.sleep(self.batch_window)
            batch = self._take_batch()
            if not batch:
                continue
            try:
                await self._write(batch)
                delay = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - classify below
                if "lease not found" in str(exc):
                    log.warning("etcd lease lost owner=%s: granting a new one", self.owner)
                    self._release(batch)
                    await self._regrant_quietly()
                    continue
                if isinstance(exc, (ClientError, OSError, asyncio.TimeoutError)) and not isinstance(
                    exc, (aetcd.InvalidArgumentError, aetcd.PreconditionFailedError)
                ):
                    self._release(batch)
                    log.warning("etcd registry write failed owner=%s ops=%d: %s; retrying in %.2fs",
                                self.owner, len(batch), exc or type(exc).__name__, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                log.error("etcd registry write rejected owner=%s ops=%d: %s",
                          self.owner, len(batch), exc)
                for op in batch:  # taken, so in the queue and in no fold
                    self._queue.remove(op)
                    if not op.future.done():
                        op.future.set_exception(exc)
                        op.future.exception()  # the caller may have stopped waiting

    async def _write(self, batch: list[_Op]) -> None:
        client = self._require_client()
        lease = self.lease_id or 0
        request = rpc.TxnRequest(
            compare=[], success=client._ops_to_requests(self._build_ops(batch, lease)), failure=[]
        )
        await client.connect()
        try:
            resp = await client.kvstub.Txn(
                request, timeout=self.rpc_timeout, metadata=client.metadata
            )
        except rpc.AioRpcError as exc:
            _handle_exception(exc)
            raise
        self.txn_count += 1
        self.ops_written += len(batch)
        rev = resp.header.revision
        for op, result in zip(batch, resp.responses, strict=True):
            if op.kind == _PUT:
                self._apply(op.key, op.gateway, rev)
                self._mark_written(op.key, op.gateway, rev)
            elif op.kind == _DELETE_IF:
                if result.response_txn.succeeded:
                    self._apply(op.key, None, rev)
            else:
                inner = result.response_txn
                if inner.succeeded or inner.responses[0].response_txn.succeeded:
                    self._apply(op.key, op.gateway, rev)
                    self._mark_written(op.key, op.gateway, rev)
                elif self._mine.get(op.key, ("",))[0] == op.gateway:
                    del self._mine[op.key]  # another gateway owns the device now
        for op in batch:
            # Only this task takes from the queue, and the batch is its head.
            head = self._queue.popleft()
            assert head is op
            if not op.future.done():
                op.future.set_result(None)

    def _mark_written(self, key: str, gateway: str, rev: int) -> None:
        mine = self._mine.get(key)
        if mine is not None and mine[0] == gateway:
            self._mine[key] = (gateway, rev)

    # ------------------------------------------------------------------ lease

    async def _grant_lease(self) -> None:
        client = self._require_client()
        lease = await asyncio.wait_for(client.lease(self.lease_ttl), self.rpc_timeout)
        self.lease_id = lease.id
        self.lease_grants += 1
        log.info("etcd lease granted owner=%s lease=%x ttl=%ss", self.owner, lease.id, lease.ttl)

    async def _regrant_quietly(self) -> None:
        """Grant a new lease (once, however many tasks noticed) and re-register ours."""
        old = self.lease_id
        async with self._lease_lock:
            if self.lease_id != old:
                return  # someone else already replaced it
            try:
                await self._grant_lease()
            except (TimeoutError, ClientError, OSError) as exc:
                log.warning("etcd lease grant failed owner=%s: %s", self.owner, exc)
                await asyncio.sleep(0.5)
                return
        queued = {op.key for op in self._queue}
        loop = asyncio.get_running_loop()
        for key, (gateway, _rev) in list(self._mine.items()):
            if key not in queued:
                self._enqueue(_Op(_REPUT, key, gateway, loop.create_future()))
        log.info("etcd re-registering owner=%s entries=%d", self.owner, len(self._mine))
        self._wakeup.set()

    async def _keepalive_loop(self) -> None:
        interval = max(0.5, self.lease_ttl / 3)
        while True:
            await asyncio.sleep(interval)
            lease = self.lease_id
            try:
                client = self._require_client()
                reply = await asyncio.wait_for(client.refresh_lease(lease), self.rpc_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the lease alive whatever happens
                if "lease not found" in str(exc):
                    await self._regrant_quietly()
                else:
                    log.warning("etcd lease keepalive failed owner=%s: %s",
                                self.owner, exc or type(exc).__name__)
                continue
            if reply is None or reply.TTL <= 0:
                log.warning("etcd lease expired owner=%s lease=%x", self.owner, lease or 0)
                await self._regrant_quietly()

    # ------------------------------------------------------------ watch/cache

    async def _sync(self) -> Any:
        """Range-read the prefix into the cache, then watch from the next revision."""
        client = self._require_client()
        resp = await asyncio.wait_for(client.get_prefix(_PREFIX_B), self.rpc_timeout)
        head = resp.header.revision
        cache: dict[str, dict[str, str]] = {}
        revs: dict[str, int] = {}
        for kv in resp.kvs:
            key = kv.key.decode()
            parts = _split_key(key)
            if parts is None:
                continue
            cache.setdefault(parts[0], {})[parts[1]] = kv.value.decode()
            revs[key] = kv.mod_revision
        # Keep this process's own writes newer than the snapshot.
        newer_puts = {k: r for k, r in self._rev.items() if r > head}
        newer_dels = {k: r for k, r in self._tomb.items() if r > head}
        old_cache = self._cache
        self._cache, self._rev, self._tomb = cache, revs, {}
        self._watch_rev = head
        for key, rev in newer_puts.items():
            parts = _split_key(key)
            if parts is not None and parts[1] in old_cache.get(parts[0], {}):
                self._apply(key, old_cache[parts[0]][parts[1]], rev)
        for key, rev in newer_dels.items():
            self._apply(key, None, rev)
        watch = await client.watch_prefix(_PREFIX_B, start_revision=head + 1)
        self._watch_live = True
        self.watch_syncs += 1
        return watch

    def _apply(self, key: str, value: str | None, rev: int) -> None:
        if rev < self._rev.get(key, 0) or rev < self._tomb.get(key, 0):
            return  # older than what we already know
        parts = _split_key(key)
        if parts is None:
            return
        user, device = parts
        if value is None:
            devices = self._cache.get(user)
            if devices is not None:
                devices.pop(device, None)
                if not devices:
                    del self._cache[user]
            self._rev.pop(key, None)
            if rev > self._watch_rev:
                self._tomb[key] = rev
        else:
            self._cache.setdefault(user, {})[device] = value
            self._rev[key] = rev
            self._tomb.pop(key, None)

    def _on_event(self, event: Any) -> None:
        key = event.kv.key.decode()
        rev = event.kv.mod_revision
        if event.kind == "PUT":
            value = event.kv.value.decode()
            self._apply(key, value, rev)
            mine = self._mine.get(key)
            if mine is not None and mine[1] and rev > mine[1] and value != mine[0]:
                del self._mine[key]  # another gateway took the device over
        else:
            self._apply(key, None, rev)
        if rev > self._watch_rev:
            self._watch_rev = rev
            if self._tomb:
                for k in [k for k, r in self._tomb.items() if r <= rev]:
                    del self._tomb[k]

    async def _watch_loop(self, watch: Any) -> None:
        delay = 0.1
        while True:
            if watch is None:
                try:
                    watch = await self._sync()
                    self._unreachable = False
                    log.info("etcd registry watch re-established owner=%s revision=%d",
                             self.owner, self._watch_rev)
                    delay = 0.1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - retry whatever went wrong
                    self._unreachable = True
                    log.warning("etcd registry resync failed owner=%s: %s; retrying in %.1fs",
                                self.owner, exc or type(exc).__name__, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    if len(self.endpoints) > 1:
                        await self._next_endpoint()
                    continue
            try:
                async for event in watch:
                    self._on_event(event)
                log.warning("etcd registry watch ended owner=%s", self.owner)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.warning("etcd registry watch lost owner=%s: %s (serving lookups from cache)",
                            self.owner, exc or type(exc).__name__)
            finally:
                self._watch_live = False
            try:
                await asyncio.wait_for(watch.cancel(), 1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.debug("etcd watch cancel failed", exc_info=True)
            watch = None

    # ----------------------------------------------------------------- client

    def _new_client(self) -> None:
        host, port = self.endpoints[self._endpoint_index]
        self._client = aetcd.Client(
            host=host, port=port, timeout=self.rpc_timeout, options=dict(_CHANNEL_OPTIONS)
        )

    def _require_client(self) -> aetcd.Client:
        if self._client is None:
            raise ClientError("etcd client closed")
        return self._client

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        await _close_quietly(client)

    async def _next_endpoint(self) -> None:
        old = self._client
        self._endpoint_index = (self._endpoint_index + 1) % len(self.endpoints)
        self._new_client()
        await _close_quietly(old)
        log.info("etcd registry switched endpoint owner=%s endpoint=%s:%d",
                 self.owner, *self.endpoints[self._endpoint_index])


def _settle_like(follower: asyncio.Future[None], leader: asyncio.Future[None]) -> None:
    """``follower`` ends as ``leader`` did (an op folded into a newer one)."""
    if follower.done():
        return
    if leader.cancelled():
        follower.cancel()
    elif leader.exception() is not None:
        follower.set_exception(leader.exception())  # type: ignore[arg-type]
        follower.exception()  # its caller may have stopped waiting
    else:
        follower.set_result(None)


async def _close_quietly(client: aetcd.Client | None) -> None:
    if client is None:
        return
    try:
        await asyncio.wait_for(client.close(), 2.0)
    except Exception:
        log.debug("etcd client close failed", exc_info=True)
