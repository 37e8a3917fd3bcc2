"""A TCP relay on a free loopback port in front of a real server, whose connections a test can cut.

The browser talks to the relay; the relay forwards bytes both ways to the server. `cut()` closes every open
connection at once (as a network drop or a proxy restart does) and, until `resume()`, closes new ones as soon as
they arrive, so a client sees its stream break and its reconnection attempts fail for a while. What clients send
is kept chunk by chunk (`sent`; browsers reuse connections, so a request head may come at any point of one), so a
test can read the request lines and headers.
"""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["TcpRelay"]

_CHUNK = 65536


class TcpRelay:
    """Forward 127.0.0.1:<port> to `target_port`; see the module docstring.

    Args:
        target_port: the server's port on 127.0.0.1.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.sent: list[bytes] = []
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._accepting = True
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name=f"tcp-relay-{self.port}", daemon=True)

    def start(self) -> TcpRelay:
        self._thread.start()
        return self

    def cut(self) -> None:
        """Close every open connection and refuse new ones until `resume()`."""
        with self._lock:
            self._accepting = False
            victims, self._open = self._open, set()
        for sock in victims:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def resume(self) -> None:
        """Forward new connections again."""
        with self._lock:
            self._accepting = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                accepting = self._accepting
            if not accepting:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = source.recv(_CHUNK)
                if not data:
                    break
                if from_client:
                    self.sent.append(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
