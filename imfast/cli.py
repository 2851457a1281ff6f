"""The ``imfast`` command line: ``serve``, ``gateway``, ``service``, ``offline-worker``,
``token``, ``config``.

Every sub-command reads settings from the environment (and ``--config``),
then applies its flags on top; a bad setting ends it with exit code 2 and a
message naming the variable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

from imfast import __version__
from imfast.config import (
    ConfigError,
    Settings,
    _port,
    _positive_float,
    _positive_int,
    load_settings,
)

__all__ = ["main"]

_EPILOG = """\
Quick start:
  imfast serve                          # embedded node on :8080 (data in ./data)
  imfast token alice                    # a token for user alice
  wscat -c "ws://localhost:8080/ws?token=$(imfast token alice)"

Every setting is an environment variable; `imfast config` lists them.
"""


def _checked(check: Any, what: str) -> Any:
    """An argparse type running one of the settings' own checks: a flag is held to
    what its environment variable is (``--port 99999`` is refused, not wrapped)."""
    def parse(text: str) -> Any:
        try:
            return check(text)
        except ValueError as exc:
            why = str(exc) if not str(exc).startswith(("invalid literal", "could not convert")) \
                else f"must be {what}"
            raise argparse.ArgumentTypeError(f"{text!r} {why}") from None

    parse.__name__ = what
    return parse


_PORT = _checked(_port, "a port number 0-65535")
_COUNT = _checked(_positive_int, "a positive whole number")
_SECONDS = _checked(_positive_float, "a positive number")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imfast",
        description="imfast: an instant-messaging WebSocket gateway.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"imfast {__version__}")
    parser.add_argument("--config", metavar="FILE",
                        help="TOML file of settings (env vars still win); also IMFAST_CONFIG")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run an embedded node: gateway + routing + storage in one process",
        description="Run an embedded node (no external service needed): WebSocket /ws and "
                    "HTTP /health /stats /metrics on one port, messages in a SQLite file "
                    "under --data-dir.")
    serve.add_argument("--host", help="listen address (HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=_PORT, help="WebSocket + HTTP port (HTTP_PORT, default 8080)")
    serve.add_argument("--data-dir", help="where the SQLite file lives (DATA_DIR, default ./data;"
                                          " ':memory:' keeps nothing)")
    serve.add_argument("--insecure-dev-auth", action="store_true",
                       help="DEMO ONLY: also accept ws://HOST/ws?user=NAME without a token")
    serve.add_argument("--log-format", choices=("json", "text"), help="LOG_FORMAT")
    serve.add_argument("--workers", type=_COUNT,
                       help="gateway worker processes sharing the port (GATEWAY_WORKERS, "
                            "default 1 = all in one process); each holds at most "
                            "MAX_CONNECTIONS/N sockets")

    token = sub.add_parser(
        "token", help="mint a client token (HS256, signed with JWT_SECRET or the dev secret)",
        description="Print a JWT for USER. Without JWT_SECRET it uses the embedded node's "
                    "dev secret in --data-dir, so it works against `imfast serve` as is.")
    token.add_argument("user", help="user id (1-64 of A-Z a-z 0-9 _ . @ -)")
    token.add_argument("--device", default="default", help="device id (default: default)")
    token.add_argument("--ttl", type=_SECONDS, default=24 * 3600, help="seconds (default 86400)")
    token.add_argument("--data-dir", help="data dir of the node (DATA_DIR, default ./data)")
    token.add_argument("--url", action="store_true",
                       help="print a ready ws:// URL with the token instead of the bare token")

    for name, helptext in (
        ("gateway", ("im-gateway-service: client sockets on HTTP_PORT, pushes on PUSH_PORT; "
                     "needs SERVICE_ADDR, ETCD_ENDPOINTS, KAFKA_BROKERS, JWT_SECRET")),
        ("service", ("im-service: routing on SERVICE_PORT; needs REDIS_URL, MYSQL_DSN, "
                     "ETCD_ENDPOINTS, KAFKA_BROKERS")),
        ("offline-worker", ("consumes offline_msg into MySQL offline_messages, 7-day TTL; "
                            "needs KAFKA_BROKERS, MYSQL_DSN")),
    ):
        role = sub.add_parser(name, help=helptext, description=helptext + ". Every setting is "
                              "an environment variable (`imfast config` lists them).")
        role.add_argument("--host", help="listen address (HOST)")
        role.add_argument("--port", type=_PORT, help="HTTP port (HTTP_PORT, default 8080)")
        role.add_argument("--log-format", choices=("json", "text"), help="LOG_FORMAT")
        if name == "gateway":
            role.add_argument("--workers", type=_COUNT,
                              help="gateway processes sharing HTTP_PORT (GATEWAY_WORKERS); "
                                   "worker i pushes on PUSH_PORT+i")

    chat = sub.add_parser(
        "chat", help="a terminal chat client (for people, and for checking a deploy)",
        description="Chat from the terminal: connect, send to a user or group, see incoming "
                    "messages, receipts and typing. `imfast chat --help` lists its commands.")
    chat.add_argument("chat_args", nargs=argparse.REMAINDER,
                      help="arguments for the chat client (see `imfast chat -- --help`)")

    sub.add_parser("config", help="list every setting: env var, default, meaning")
    return parser


def _apply(settings: Settings, **flags: object) -> Settings:
    changes = {k: v for k, v in flags.items() if v is not None and v is not False}
    return settings.replace(**changes) if changes else settings


def _cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    settings = _apply(settings, host=args.host, http_port=args.port, data_dir=args.data_dir,
                      insecure_dev_auth=args.insecure_dev_auth, log_format=args.log_format,
                      workers=args.workers)
    from imfast.logs import setup_logging

    setup_logging(settings.log_format, settings.log_level, "embedded")
    from imfast.runtime import tune_gc

    tune_gc()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux
        uvloop = None  # type: ignore[assignment]

    async def run() -> None:
        from imfast._core import USING_EXTENSIONS
        from imfast.node import EmbeddedNode, run_until_signalled

        node: Any
        if settings.workers > 1:
            from imfast.workers import EmbeddedSupervisor

            node = EmbeddedSupervisor(settings, settings.workers)
        else:
            node = EmbeddedNode(settings)
        port = await node.start()
        host = "localhost" if settings.host in ("0.0.0.0", "::", "") else settings.host
        data = settings.data_dir
        lines = [
            (f"imfast {__version__} embedded node (Cython core: "
             f"{'yes' if USING_EXTENSIONS else 'no, pure Python'}; "
             f"{settings.workers} gateway process{'es' if settings.workers > 1 else ''})"),
            (f"  WebSocket   ws://{host}:{port}/ws?token=TOKEN   (or send {{\"type\":\"auth\","
             f"\"token\":TOKEN}} first)"),
            f"  Health      http://{host}:{port}/health   /stats   /metrics",
            f"  Data        {data if data == ':memory:' else data + '/imfast.db'}",
            f"  Get a token imfast token alice --data-dir {data}",
            (f"  Try it      wscat -c \"ws://{host}:{port}/ws?token=$(imfast token alice "
             f"--data-dir {data})\""),
        ]
        if settings.insecure_dev_auth:
            lines.append("  WARNING     --insecure-dev-auth: anyone can connect as anyone with "
                         f"ws://{host}:{port}/ws?user=NAME  (demo only!)")
        print("\n".join(lines), file=sys.stderr, flush=True)
        await run_until_signalled(node)

    if uvloop is not None:
        uvloop.run(run())
    else:  # pragma: no cover
        asyncio.run(run())
    return 0


def _cmd_role(settings: Settings, args: argparse.Namespace) -> int:
    """Run one distributed role until SIGTERM (which drains first)."""
    settings = _apply(settings, host=args.host, http_port=args.port, log_format=args.log_format,
                      workers=getattr(args, "workers", None))
    from imfast.logs import setup_logging

    setup_logging(settings.log_format, settings.log_level, args.command)
    from imfast.runtime import tune_gc

    tune_gc()

    def make_node() -> Any:
        if args.command == "gateway" and settings.workers > 1:
            from imfast.workers import GatewaySupervisor

            return GatewaySupervisor(settings, settings.workers)
        if args.command == "gateway":
            from imfast.gateway.cluster import GatewayNode

            return GatewayNode(settings)
        if args.command == "service":
            from imfast.service.node import ServiceNode

            return ServiceNode(settings)
        from imfast.offline.worker import OfflineWorker

        return OfflineWorker(settings)

    async def run() -> None:
        from imfast.node import run_until_signalled
        from imfast.startup import start_when_backends_are_up

        # A backend that is down is waited for (serving /health/live meanwhile).
        node = await start_when_backends_are_up(make_node, settings, args.command)
        if node is None:
            return  # signalled while waiting
        print(f"imfast {args.command} running (HTTP {settings.http_port})", file=sys.stderr,
              flush=True)
        await run_until_signalled(node)

    import uvloop

    uvloop.run(run())
    return 0


def _cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    from imfast.auth import mint_token

    settings = _apply(settings, data_dir=args.data_dir)
    if not settings.jwt_secret and not os.path.isdir(settings.data_dir):
        # A mistyped path must not mint with a fresh secret the node never saw.
        print(f"imfast token: no data dir {settings.data_dir!r}: pass the node's --data-dir "
              f"(start `imfast serve` first), or set JWT_SECRET", file=sys.stderr)
        return 2
    try:
        token = mint_token(settings, args.user, args.device, args.ttl)
    except ValueError as exc:
        print(f"imfast token: {exc}", file=sys.stderr)
        return 2
    if args.url:
        print(f"ws://localhost:{settings.http_port}/ws?token={token}")
    else:
        print(token)
    return 0


def _cmd_config() -> int:
    rows = Settings.describe()
    width = max(len(r[0]) for r in rows)
    try:
        for env, default, doc in rows:
            print(f"{env:<{width}}  {doc}  [default: {default or '-'}]")
        sys.stdout.flush()
    except BrokenPipeError:  # `imfast config | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imfast`` command; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["chat"]:
        # The chat client parses its own options (argparse REMAINDER would not take them).
        from imfast.client.chat import main as chat_main

        return chat_main(args_list[1:])
    parser = _build_parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "config":
        return _cmd_config()
    if args.command == "chat":
        from imfast.client.chat import main as chat_main

        return chat_main(args.chat_args)
    try:
        settings = load_settings(config_file=args.config)
        if args.command == "serve":
            return _cmd_serve(settings, args)
        if args.command in ("gateway", "service", "offline-worker"):
            return _cmd_role(settings, args)
        return _cmd_token(settings, args)
    except ConfigError as exc:
        print(f"imfast {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
