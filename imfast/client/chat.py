"""``imfast chat``: a terminal chat client built on the SDK (docs/client.md).

Interactive: lines read from stdin are commands (``/to bob``, ``/group team``,
``/join team``, ``/create team bob carol``, ``/history``, ``/quit``, ``/help``)
or text sent to the current target; incoming messages, receipts, typing and
group events are printed as they arrive::

    [p:alice:bob #3] alice: hi

One-shot (for runbooks): ``imfast chat --token T --send bob "text"`` sends one
message, prints the server's ``sent`` as JSON and exits 0; any failure exits 1
with the reason on stderr (usage errors exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from imfast.client.errors import ClientError, ConnectionClosed, ServerError
from imfast.client.events import (
    Connected,
    Disconnected,
    Entry,
    GroupEvent,
    Message,
    Presence,
    Recall,
    Receipt,
    Typing,
)
from imfast.client.sdk import Client
from imfast.client.store import JsonFileCursorStore
from imfast.protocol.ids import group_conv, is_valid_id, private_conv

__all__ = ["main"]

DEFAULT_URL = "ws://localhost:8080/ws"

HELP = """\
commands:
  /to USER              talk to USER (private chat)
  /group GROUP          talk in GROUP (you must be a member)
  /join GROUP           join GROUP and talk there
  /create GROUP [USER...]  create GROUP with these members and talk there
  /leave [GROUP]        leave GROUP (default: the current one)
  /invite USER...       add users to the current group (owner/admin)
  /members              members of the current group
  /groups               your groups
  /conversations        your conversations and their latest seq
  /history [N]          the last N (default 20) entries of the current chat
  /recall SEQ           recall your message SEQ in the current chat
  /who USER...          who is online
  /help                 this list
  /quit                 leave (also Ctrl-D)
anything else is sent to the current chat."""


class UsageError(Exception):
    """Bad command-line arguments (exit code 2)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imfast chat",
        description="Chat from the terminal, or send one message and print the ack "
                    "(--send). Type /help once connected for the commands.",
        epilog="Examples:\n"
               "  imfast chat --user alice --data-dir ./data      # dev token from the node's "
               "data dir\n"
               "  imfast chat --token \"$TOKEN\" --url ws://im.example.com/ws\n"
               "  imfast chat --insecure-user bob                  # server runs with "
               "--insecure-dev-auth\n"
               "  imfast chat --token \"$TOKEN\" --send bob 'deploy check'   # exit 0 when "
               "stored",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("IMFAST_URL", DEFAULT_URL),
                   help=f"WebSocket URL (IMFAST_URL, default {DEFAULT_URL})")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--token", default=os.environ.get("IMFAST_TOKEN"),
                     help="a JWT (IMFAST_TOKEN); `imfast token USER` prints one")
    who.add_argument("--user", help="mint a dev token for USER with the node's secret "
                                    "(JWT_SECRET, or the dev secret in --data-dir)")
    who.add_argument("--insecure-user", metavar="NAME",
                     help="connect as ws://.../ws?user=NAME (server started with "
                          "--insecure-dev-auth)")
    p.add_argument("--device", help="device id for --user / --insecure-user (default: default)")
    p.add_argument("--data-dir", help="the node's data dir, for --user (DATA_DIR, default ./data)")
    p.add_argument("--config", help="TOML settings file, for --user (IMFAST_CONFIG)")
    p.add_argument("--state", metavar="FILE",
                   help="keep the last seen seq per conversation in this JSON file, so a "
                        "restarted client never shows a message twice")
    p.add_argument("--send", nargs=2, metavar=("TO", "TEXT"),
                   help="send TEXT to user TO (or g:GROUP), print the ack as JSON, exit")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the connection and the ack (default 10)")
    return p


def _client_for(args: argparse.Namespace) -> Client:
    """A :class:`Client` for the credentials on the command line."""
    store = JsonFileCursorStore(args.state) if args.state else None
    common: dict[str, Any] = {"store": store, "connect_timeout": args.timeout}
    if args.insecure_user:
        if not is_valid_id(args.insecure_user):
            raise UsageError(f"--insecure-user {args.insecure_user!r} is not a valid user id")
        return Client(args.url, dev_user=args.insecure_user, device=args.device, **common)
    if args.user:
        return Client(args.url, _mint(args), **common)
    if not args.token:
        raise UsageError("say who you are: --token TOKEN, --user NAME (dev token) or "
                         "--insecure-user NAME")
    return Client(args.url, args.token, device=args.device, **common)


def _mint(args: argparse.Namespace) -> str:
    from imfast.auth import DEV_SECRET_FILE, mint_token
    from imfast.config import ConfigError, load_settings

    try:
        settings = load_settings(config_file=args.config)
        if args.data_dir:
            settings = settings.replace(data_dir=args.data_dir)
        if not settings.jwt_secret and settings.jwt_algorithm == "HS256":
            secret = Path(settings.data_dir) / DEV_SECRET_FILE
            if not secret.is_file():
                raise UsageError(f"no dev secret at {secret}: pass the node's --data-dir "
                                 "(or set JWT_SECRET)")
        return mint_token(settings, args.user, args.device or "default", 24 * 3600)
    except (ConfigError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """``imfast chat ARGS``; returns the exit code (0 ok, 1 failed, 2 usage)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--"]:  # `imfast chat -- --url ...`
        args_list = args_list[1:]
    args = _parser().parse_args(args_list)
    # The SDK logs what it also raises; here the reasons are printed for a person.
    logging.getLogger("imfast.client").setLevel(logging.ERROR)
    try:
        client = _client_for(args)
        if args.send:
            to, text = args.send
            target = _target(to)
            return _run(_send_once(client, target, text, args.timeout))
        return _run(Chat(client, sys.stdout).run(sys.stdin))
    except UsageError as exc:
        print(f"imfast chat: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"imfast chat: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return int(asyncio.run(coro))
    return int(uvloop.run(coro))


def _target(text: str) -> tuple[str, str]:
    """("to" | "group", id) from ``bob``, ``g:team`` or ``#team``."""
    kind, name = "to", text
    if text.startswith(("g:", "#")):
        kind, name = "group", text[2:] if text.startswith("g:") else text[1:]
    if not is_valid_id(name):
        raise UsageError(f"{text!r} is not a user id (or g:GROUP)")
    return kind, name


async def _send_once(client: Client, target: tuple[str, str], text: str,
                     timeout: float) -> int:
    """Connect, send, print the ``sent`` as JSON; 0 on success, 1 with a reason otherwise."""
    try:
        await client.connect()
        kind, name = target
        sent = await asyncio.wait_for(client.send(text, **{kind: name}), timeout)
    except TimeoutError:
        print(f"imfast chat: no ack from {client.url} within {timeout:g} s", file=sys.stderr)
        return 1
    except ServerError as exc:
        print(f"imfast chat: the server refused the message: {exc}", file=sys.stderr)
        return 1
    except ConnectionClosed as exc:
        print(f"imfast chat: {_closed_text(exc)}", file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"imfast chat: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    print(json.dumps({"type": "sent", **asdict(sent)}), flush=True)
    return 0


def _closed_text(exc: ConnectionClosed) -> str:
    if exc.code in (4500, 4006):
        return f"authentication failed ({exc.code}): {exc.reason}"
    return f"connection closed ({exc.code}): {exc.reason}"


class Chat:
    """The interactive client: commands in, events out (see the module docstring)."""

    def __init__(self, client: Client, out: TextIO) -> None:
        self.client = client
        self.out = out
        self.conv = ""  # the current chat
        self.kind = ""  # "to" or "group"
        self.name = ""
        self.typing_shown: dict[tuple[str, str], float] = {}
        self.unread: dict[str, int] = {}  # conv -> seq to mark read

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    async def run(self, stdin: TextIO) -> int:
        try:
            hello = await self.client.connect()
        except ConnectionClosed as exc:
            self.say(f"! {_closed_text(exc)}")
            return 1
        except ClientError as exc:
            self.say(f"! {exc}")
            return 1
        self.say(f"* connected as {hello.user} (device {hello.device}) to {hello.server}; "
                 "/help lists the commands, /to USER starts a chat")
        lines = _stdin_lines(stdin)
        printer = asyncio.create_task(self._print_events())
        reader = asyncio.create_task(self._mark_read_loop())
        code = 0
        try:
            while True:
                get = asyncio.ensure_future(lines.get())
                done, _ = await asyncio.wait({get, printer}, return_when=asyncio.FIRST_COMPLETED)
                if printer in done:
                    get.cancel()
                    code = 1 if printer.result() else 0
                    break
                line = get.result()
                if line is None or not await self.handle(line.rstrip("\n")):
                    break
        finally:
            reader.cancel()
            await self.client.close()
            if not printer.done():
                await asyncio.wait({printer}, timeout=2)
        return code

    async def handle(self, line: str) -> bool:
        """One input line; False to quit."""
        if not line.strip():
            return True
        if not line.startswith("/"):
            self.send(line)
            return True
        cmd, *rest = line.split()
        try:
            return await self.command(cmd.lower(), rest)
        except ServerError as exc:
            self.say(f"! {exc}")
        except (ValueError, UsageError) as exc:
            self.say(f"! {exc}")
        except ClientError as exc:
            self.say(f"! {exc}")
        return True

    async def command(self, cmd: str, rest: list[str]) -> bool:
        c = self.client
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/to" and len(rest) == 1:
            self.target("to", _target(rest[0])[1])
        elif cmd == "/group" and len(rest) == 1:
            self.target("group", _target("g:" + rest[0].removeprefix("#"))[1])
        elif cmd == "/join" and len(rest) == 1:
            members = await c.group_join(rest[0])
            self.say(f"* joined {rest[0]}: {', '.join(sorted(members))}")
            self.target("group", rest[0])
        elif cmd == "/create" and rest:
            members = await c.group_create(rest[0], rest[1:])
            self.say(f"* created {rest[0]}: {', '.join(sorted(members))}")
            self.target("group", rest[0])
        elif cmd == "/leave":
            group = rest[0] if rest else (self.name if self.kind == "group" else "")
            if not group:
                raise UsageError("/leave GROUP")
            await c.group_leave(group)
            self.say(f"* left {group}")
        elif cmd == "/invite" and rest and self.kind == "group":
            members = await c.group_invite(self.name, rest)
            self.say(f"* members of {self.name}: {', '.join(sorted(members))}")
        elif cmd == "/members" and self.kind == "group":
            members = await c.group_members(self.name)
            self.say("* " + ", ".join(f"{u} ({r})" for u, r in sorted(members.items())))
        elif cmd == "/groups":
            self.say("* groups: " + (", ".join(await c.groups()) or "none"))
        elif cmd == "/conversations":
            convs = await c.conversations()
            for conv, latest in sorted(convs.latest.items()):
                self.say(f"* {conv}  latest #{latest}  (read on this device: "
                         f"#{convs.cursors.get(conv, 0)})")
            if not convs.latest:
                self.say("* no conversations yet")
        elif cmd == "/history":
            self.need_target()
            limit = int(rest[0]) if rest else 20
            entries = await c.history(self.conv, limit=limit)
            for entry in entries:
                self.say(self.entry_line(entry))
            if not entries:
                self.say(f"* nothing in {self.conv} yet")
        elif cmd == "/recall" and len(rest) == 1:
            self.need_target()
            await c.recall(self.conv, int(rest[0]))
        elif cmd == "/who" and rest:
            for user, p in (await c.presence(rest)).items():
                self.say(f"* {user} is {'online' if p.online else 'offline'}")
        else:
            self.say(f"! unknown command or arguments: {cmd} {' '.join(rest)}".rstrip()
                     + " (see /help)")
        return True

    def need_target(self) -> None:
        if not self.conv:
            raise UsageError("no chat yet: /to USER or /group GROUP first")

    def target(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name
        self.conv = private_conv(self.client.user, name) if kind == "to" else group_conv(name)
        self.say(f"* now talking to {name if kind == 'to' else 'group ' + name} ({self.conv})")

    def send(self, text: str) -> None:
        if not self.conv:
            self.say("! no chat yet: /to USER or /group GROUP first")
            return
        kind, name, conv = self.kind, self.name, self.conv

        async def go() -> None:
            try:
                sent = await self.client.send(text, **{kind: name})
            except ClientError as exc:
                self.say(f"! not sent to {conv}: {exc}")
                return
            self.say(f"[{sent.conv} #{sent.seq}] (sent)")

        asyncio.create_task(go())

    # ------------------------------------------------------------- output
    async def _print_events(self) -> bool:
        """Print events until the client stops; True if it stopped on an error."""
        try:
            async for event in self.client.events():
                self.print_event(event)
        except ConnectionClosed as exc:
            self.say(f"! {_closed_text(exc)}; not reconnecting")
            return True
        return False

    def print_event(self, event: Any) -> None:
        me = self.client.user
        if isinstance(event, Entry):
            self.say(self.entry_line(event))
            if event.conv == self.conv and event.sender != me:
                self.unread[event.conv] = max(self.unread.get(event.conv, 0), event.seq)
        elif isinstance(event, Receipt):
            self.say(f"[{event.conv}] {event.user} read up to #{event.seq}")
        elif isinstance(event, Typing):
            key, now = (event.conv, event.user), time.monotonic()
            if now - self.typing_shown.get(key, 0.0) > 3.0:
                self.typing_shown[key] = now
                self.say(f"[{event.conv}] {event.user} is typing...")
        elif isinstance(event, Presence):
            self.say(f"* {event.user} is {'online' if event.online else 'offline'}")
        elif isinstance(event, Connected) and event.reconnected:
            self.say(f"* reconnected to {event.server}")
        elif isinstance(event, Disconnected) and event.reconnect_in is not None:
            self.say(f"* disconnected ({event.code} {event.reason}); reconnecting in "
                     f"{event.reconnect_in:.1f} s")

    def entry_line(self, entry: Entry) -> str:
        head = f"[{entry.conv} #{entry.seq}]"
        if isinstance(entry, Message):
            return f"{head} {entry.sender}: {entry.body}"
        if isinstance(entry, Recall):
            return f"{head} * {entry.sender} recalled #{entry.recalled_seq}"
        if isinstance(entry, GroupEvent):
            users = ", ".join(entry.users)
            what = {
                "created": f"created the group: {users}",
                "joined": "joined",
                "left": "left",
                "invited": f"invited {users}",
                "removed": f"removed {users}",
            }.get(entry.event, f"{entry.event.replace(':', ' ')} {users}".strip())
            return f"{head} * {entry.by} {what}"
        return f"{head} ?"

    async def _mark_read_loop(self) -> None:
        """Tell the others what you have seen in the current chat (twice a second)."""
        while True:
            await asyncio.sleep(0.5)
            for conv, seq in list(self.unread.items()):
                del self.unread[conv]
                try:
                    await self.client.read(conv, seq)
                except ClientError:
                    pass


def _stdin_lines(stdin: TextIO) -> asyncio.Queue[str | None]:
    """Lines of ``stdin`` (None at EOF), read by a daemon thread so exiting never waits."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        try:
            for line in stdin:
                loop.call_soon_threadsafe(queue.put_nowait, line)
            loop.call_soon_threadsafe(queue.put_nowait, None)
        except RuntimeError:  # the loop is gone: we are exiting
            pass

    threading.Thread(target=read, name="imfast-chat-stdin", daemon=True).start()
    return queue


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
