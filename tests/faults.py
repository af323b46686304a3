"""A fault-injecting HTTP proxy for an S3 endpoint: the network a long job really meets.

Each request is forwarded to the endpoint, or, at the configured rates, answered with a
503 SlowDown / 500 InternalError, or has its connection dropped without an answer. With
`down` set, every request gets a 503; with `refuse` set, every request for which
`refuse(method, path)` is true does (it sees every request, so it can count them).
"""
from __future__ import annotations

import http.client
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
ERRORS = [
    (503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"),
    (500, b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"),
]


class FaultyProxy:
    def __init__(self, target: str, error_rate: float = 0.0, drop_rate: float = 0.0, seed: int = 0):
        self.target = urlsplit(target)
        self.error_rate, self.drop_rate, self.down = error_rate, drop_rate, False
        self.refuse = None
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"forwarded": 0, "errors": 0, "drops": 0}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "FaultyProxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _decide(self, method: str = "", path: str = "") -> str:
        with self.lock:
            if self.down or (self.refuse is not None and self.refuse(method, path)):
                return "error"
            r = self.rng.random()
            if r < self.drop_rate:
                return "drop"
            if r < self.drop_rate + self.error_rate:
                return "error"
            return "forward"

    def _count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _any(self):
                body = self._body()
                action = proxy._decide(self.command, self.path)
                if action == "drop":
                    proxy._count("drops")
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if action == "error":
                    proxy._count("errors")
                    status, payload = proxy.rng.choice(ERRORS)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                proxy._count("forwarded")
                conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                self.send_response(response.status, response.reason)
                for k, v in response.getheaders():
                    # a HEAD answer's Content-Length is the object's size: pass it through
                    if k.lower() not in HOP_BY_HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler
