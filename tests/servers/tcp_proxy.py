"""A switchable TCP proxy on 127.0.0.1, to make a real server "go down" and come back with its data.

    proxy = TcpProxy(target_port).start()
    proxy.url            # http://127.0.0.1:<port>, point clients here
    proxy.set_up(False)  # open connections are cut, new ones are closed at once (like a dead host)
    proxy.set_up(True)   # traffic flows again to the same server, state intact
    proxy.refused        # connections turned away while down
    proxy.stop()

moto keeps its state in memory, so stopping and restarting the server would lose it; this sits in
front of it instead. Loopback only; every thread is a daemon and ends with `stop()`.
"""

from __future__ import annotations

import socket
import threading


class TcpProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1"):
        self.target = (host, target_port)
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._up = True
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._stopped = False
        self.refused = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "TcpProxy":
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()
        return self

    def set_up(self, up: bool) -> None:
        with self._lock:
            self._up = up
            if not up:
                for s in self._open:
                    _close(s)
                self._open.clear()

    def stop(self) -> None:
        self._stopped = True
        self.set_up(False)
        _close(self._listener)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if not self._up:
                    self.refused += 1
                    _close(client)
                    continue
                try:
                    server = socket.create_connection(self.target, timeout=10)
                    server.settimeout(None)
                except OSError:
                    _close(client)
                    continue
                self._open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _close(src)
        _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
