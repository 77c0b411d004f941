"""Multi-host serving: process 0 schedules, every process runs the same device steps.

JAX is multi-controller: a program over a mesh that spans several processes runs only when
every process launches it, in the same order, with the same inputs. The server therefore runs
its gRPC front and its engine core (on a thread: this process must be JAX's process 0) on
process 0, the leader, only, and the leader's `BroadcastingRunner` sends each device call's
host inputs to the other processes (followers) over a TCP connection before making the call
itself; `run_follower` replays them:

    process 0: gRPC ─▶ EngineCore ─▶ BroadcastingRunner ─┬─▶ Runner (its devices)
                                                          └─ frames ─▶ process i: run_follower
                                                                       ─▶ Runner (its devices)

The calls replayed are the runner's whole device vocabulary: `init_state`, `compile_all`,
`decode`, `prefill`, `verify` (warm-up's padding runs are decode and prefill calls too), and
`stop`. Outputs are replicated, so the leader reads tokens from its own copy. A frame is a
4-byte big-endian length, a JSON header (call, flags, and each array's name, dtype and shape)
and the arrays' bytes: no pickle.

Limits: the connection is plain TCP on the coordinator's network (as trusted as JAX's own
coordinator); a follower that dies leaves the leader's next collective waiting, as in any JAX
multi-process program; the server's mesh has dp = 1 here (pp and tp any).
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import time

import numpy as np

from jaxinfer.errors import ConfigError
from jaxinfer.runner import Runner

logger = logging.getLogger(__name__)

_LEN = struct.Struct(">I")


def _send(sock: socket.socket, call: str, arrays: dict[str, np.ndarray] | None = None,
          **flags) -> None:
    arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
    header = json.dumps({"call": call, "flags": flags,
                         "arrays": [[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()]}
                        ).encode()
    parts = [_LEN.pack(len(header)), header] + [v.tobytes() for v in arrays.values()]
    body = b"".join(parts)
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("the leader closed the step connection")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[str, dict[str, np.ndarray], dict]:
    body = _recv_exact(sock, _LEN.unpack(_recv_exact(sock, _LEN.size))[0])
    (hlen,) = _LEN.unpack_from(body)
    header = json.loads(body[_LEN.size: _LEN.size + hlen])
    offset, arrays = _LEN.size + hlen, {}
    for name, dtype, shape in header["arrays"]:
        dt = np.dtype(dtype)
        size = dt.itemsize * int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.frombuffer(body, dt, count=size // dt.itemsize,
                                     offset=offset).reshape(shape)
        offset += size
    return header["call"], arrays, header["flags"]


def step_address(coordinator: str, step_port: int | None) -> tuple[str, int]:
    """Where the leader listens for followers: the coordinator's host, `step_port` or the
    coordinator's port + 1."""
    host, _, port = coordinator.rpartition(":")
    return host, step_port if step_port is not None else int(port) + 1


class StepChannel:
    """The leader's connections to every follower. It listens at once (so followers can
    connect while the model loads, which needs every process) and accepts them at the first
    send, which comes after the load."""

    def __init__(self, address: tuple[str, int], num_followers: int, *,
                 timeout: float = 300.0) -> None:
        self.address, self.num_followers, self.timeout = address, num_followers, timeout
        self._socks: list[socket.socket] = []
        try:
            self._server: socket.socket | None = socket.create_server(address)
        except OSError as e:
            raise ConfigError(f"cannot listen for follower processes on "
                              f"{address[0]}:{address[1]}: {e}") from None

    def _accept_all(self) -> None:
        server, self._server = self._server, None
        server.settimeout(self.timeout)
        try:
            while len(self._socks) < self.num_followers:
                try:
                    conn, peer = server.accept()
                except TimeoutError:
                    raise ConfigError(
                        f"only {len(self._socks)} of {self.num_followers} follower processes "
                        f"connected to {self.address[0]}:{self.address[1]} within "
                        f"{self.timeout:.0f} s") from None
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._socks.append(conn)
                logger.info("follower %s connected (%d/%d)", peer, len(self._socks),
                            self.num_followers)
        finally:
            server.close()

    def send(self, call: str, arrays: dict[str, np.ndarray] | None = None, **flags) -> None:
        if self._server is not None:
            self._accept_all()
        for s in self._socks:
            _send(s, call, arrays, **flags)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for s in self._socks:
            try:
                _send(s, "stop")
                s.close()
            except OSError:
                pass
        self._socks = []


def connect(address: tuple[str, int], *, timeout: float = 300.0) -> socket.socket:
    """A follower's connection to the leader, retried until the leader listens."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(address, timeout=10)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as e:
            if time.monotonic() > deadline:
                raise ConfigError(f"cannot reach the leader's step port "
                                  f"{address[0]}:{address[1]}: {e}") from None
            time.sleep(0.2)


class BroadcastingRunner(Runner):
    """A `Runner` that first sends each device call to the followers."""

    def __init__(self, *args, channel: StepChannel, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.channel = channel

    def init_state(self) -> None:
        self.channel.send("init_state")
        super().init_state()

    def compile_all(self, *, max_workers: int, progress=None) -> None:
        self.channel.send("compile_all", max_workers=max_workers)
        super().compile_all(max_workers=max_workers, progress=progress)

    def decode(self, inputs, *, num_steps: int, full: bool):
        self.channel.send("decode", dict(inputs=inputs), num_steps=num_steps, full=bool(full))
        return super().decode(inputs, num_steps=num_steps, full=full)

    def prefill(self, inputs, *, chunk: int):
        self.channel.send("prefill", dict(inputs=inputs), chunk=chunk)
        return super().prefill(inputs, chunk=chunk)

    def verify(self, inputs, *, chunk: int, width: int):
        self.channel.send("verify", dict(inputs=inputs), chunk=chunk, width=width)
        return super().verify(inputs, chunk=chunk, width=width)

    def close(self) -> None:
        self.channel.close()


def run_follower(runner: Runner, sock: socket.socket) -> None:
    """Replay the leader's device calls until it says stop (or goes away)."""
    while True:
        try:
            call, arrays, flags = _recv(sock)
        except ConnectionError:
            logger.warning("the leader went away: stopping")
            return
        if call == "stop":
            return
        if call == "init_state":
            runner.init_state()
        elif call == "compile_all":
            runner.compile_all(max_workers=flags["max_workers"])
        elif call == "decode":
            runner.decode(arrays["inputs"], num_steps=flags["num_steps"], full=flags["full"])
        elif call == "prefill":
            runner.prefill(arrays["inputs"], chunk=flags["chunk"])
        elif call == "verify":
            runner.verify(arrays["inputs"], chunk=flags["chunk"], width=flags["width"])
        else:
            raise ValueError(f"unknown step call {call!r} from the leader")
