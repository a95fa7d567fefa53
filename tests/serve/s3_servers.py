"""A real S3-compatible server for tests (moto's server mode on 127.0.0.1, a free port) and a proxy in front of
it that cuts adapter downloads halfway (a store that goes away mid-download). Nothing else is contacted."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """An S3 server on 127.0.0.1 (moto.server.ThreadedMotoServer); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


class CuttingProxy:
    """HTTP proxy on 127.0.0.1, one request per connection: answers a GET of a key containing `cut` with its
    headers and half its body, then closes the connection; everything else passes whole."""

    def __init__(self, upstream: str, cut: str = "adapter_model.safetensors") -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream, self.cut = (host, int(port)), cut.encode()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.cuts = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(client,), daemon=True).start()

    def _one(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream) as upstream:
            request = _read_head(client)
            head, _, rest = request.partition(b"\r\n\r\n")
            lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
            length = next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:")), 0)
            while len(rest) < length:
                rest += client.recv(65536)
            upstream.sendall(b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + rest)
            cutting = lines[0].startswith(b"GET ") and self.cut in lines[0] and b"list-type" not in lines[0]
            response = _read_head(upstream)
            if not cutting:
                client.sendall(response)
                while chunk := upstream.recv(65536):
                    client.sendall(chunk)
                return
            head, _, body = response.partition(b"\r\n\r\n")
            total = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                         if line.lower().startswith(b"content-length:"))
            while len(body) < total // 2:
                body += upstream.recv(65536)
            client.sendall(head + b"\r\n\r\n" + body[: total // 2])
            self.cuts += 1
            client.shutdown(socket.SHUT_RDWR)


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
