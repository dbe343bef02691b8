"""Calls between processes: a Unix socket per actor on one node, Ray calls otherwise.

A MoE step makes 2L calls from each train worker to the router and 2L fan-outs from the router
to the expert actors, one after the other. As Ray actor tasks these cost 0.5-1 ms each, and a
fan-out to 2 actors 2.3-3.7 ms on a loaded 2-core machine; the same request/reply over a
Unix-domain socket costs 46-62 microseconds (both measured here). So the router and every
expert actor also serve their ``forward`` and ``backward`` on a socket, and a caller on the same
node uses it; set-up, the optimizer step, checkpoints and peers on other nodes stay Ray calls
(``experts.calls: ray`` makes every call one).

A call is a length-prefixed pickle of small plain values: the tensors themselves travel in
the wire buffers (wire.py), never through the socket. Each connection is served by its own
thread, so a method served here runs beside the actor's Ray calls: the served object guards its
state itself. A peer that dies closes its end, and the caller hears of it at once
(``PeerLost``) instead of after a timeout.
"""
from __future__ import annotations

import os
import pickle
import socket
import struct
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import ray

CALL_TIMEOUT_S = 600.0  # the default deadline of a call (experts.call_timeout_s)
KNOB = "experts.call_timeout_s"  # what sets the deadline, named when a call misses it
_HEADER = struct.Struct("!Q")


class PeerLost(RuntimeError):
    """The called process is gone (its socket closed, or Ray says the actor died), or it is
    stuck: either way the job has lost it, and recovers (distributed/recovery.py)."""


class PeerStuck(PeerLost):
    """The called process is alive but did not answer within the call's deadline."""


class RemoteError(RuntimeError):
    """The called method raised; the message carries the peer's traceback."""


def socket_name(link_id: str) -> str:
    """The socket of the process whose link id is ``link_id``. On Linux an abstract socket:
    no file to leave behind when the process is killed, no path-length limit."""
    if sys.platform.startswith("linux"):
        return f"\0expertpar-calls-{link_id}"
    return str(Path(tempfile.gettempdir()) / f"expertpar-calls-{link_id}.sock")


def _send(conn: socket.socket, value) -> None:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    conn.sendall(_HEADER.pack(len(payload)) + payload)


def _recv_exactly(conn: socket.socket, n: int) -> bytearray | None:
    data = bytearray(n)
    view, got = memoryview(data), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            return None  # the other end closed
        got += k
    return data


def _recv(conn: socket.socket):
    header = _recv_exactly(conn, _HEADER.size)
    if header is None:
        return _CLOSED
    body = _recv_exactly(conn, _HEADER.unpack(header)[0])
    if body is None:
        return _CLOSED
    return pickle.loads(body)


_CLOSED = object()


def _peer_uid(conn: socket.socket) -> int | None:
    """The user the process at the other end runs as (SO_PEERCRED, Linux; None elsewhere)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    struct.calcsize("3i")))
    return uid


def _same_user(conn: socket.socket) -> bool:
    """Whether the process at the other end runs as this user (elsewhere than Linux the
    socket file's 0600 mode keeps others out)."""
    uid = _peer_uid(conn)
    return uid is None or uid == os.getuid()


class CallServer:
    """Serves ``methods`` of ``target`` on the socket named after ``link_id``, one thread per
    connection; ``close`` stops taking calls."""

    def __init__(self, target, link_id: str, methods: set[str]):
        self.target = target
        self.methods = frozenset(methods)
        self.name = socket_name(link_id)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.name)
        if not self.name.startswith("\0"):
            os.chmod(self.name, 0o600)  # a socket file: this user only
        self._listener.listen(64)
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="expertpar-calls", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not _same_user(conn):
                # A call is a pickle, and unpickling runs code: only this user's processes
                # (Ray's workers and actors) may call. An abstract socket has no file
                # permissions to say so, so the kernel's word on the caller decides.
                conn.close()
                continue
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="expertpar-call",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                request = _recv(conn)
                if request is _CLOSED:
                    return
                method, args, kwargs = request
                try:
                    if method not in self.methods:
                        raise AttributeError(f"{method!r} is not served on this socket")
                    reply = (True, getattr(self.target, method)(*args, **kwargs))
                except BaseException as err:  # the caller must hear of it, whatever it is
                    # A loss seen here (this process lost one of its peers) stays a loss for
                    # the caller: recovery tells losses from bugs by it.
                    reply = (False, (isinstance(err, PeerLost),
                                     f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
                _send(conn, reply)
        except OSError:
            return  # the caller went away mid-call; nothing to answer
        finally:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._listener.close()
        if not self.name.startswith("\0"):
            Path(self.name).unlink(missing_ok=True)


class Peer:
    """A process this one calls: through its socket when ``link_id`` is given (same node, and
    it serves one), else through its Ray actor ``handle``. ``name`` says who it is in errors.

    ``request`` sends and returns a ``Pending`` whose ``result`` waits for the reply, so a
    caller can have several peers compute at once; one request per peer at a time. A call
    that misses its deadline ``timeout_s`` names ``knob``, which sets it.
    """

    def __init__(self, handle, name: str, link_id: str | None = None,
                 timeout_s: float = CALL_TIMEOUT_S, knob: str = KNOB):
        self.handle = handle
        self.name = name
        self.link_id = link_id
        self.timeout_s = timeout_s
        self.knob = knob
        self._conn: socket.socket | None = None
        self._lock = threading.Lock()  # held from a request until its reply is read

    @property
    def via_socket(self) -> bool:
        return self.link_id is not None

    def call(self, method: str, *args, **kwargs):
        return self.request(method, *args, **kwargs).result()

    def request(self, method: str, *args, **kwargs) -> Pending:
        if not self.via_socket:
            return Pending(self, method, ref=getattr(self.handle, method).remote(*args, **kwargs),
                           timeout_s=self.timeout_s)
        self._lock.acquire()
        try:
            conn = self._connected()
            _send(conn, (method, args, kwargs))
        except BaseException as err:
            self._drop()
            self._lock.release()
            if isinstance(err, OSError):
                raise PeerLost(f"{self.name} is unreachable ({method}): {err}") from err
            raise
        return Pending(self, method, conn=conn, timeout_s=self.timeout_s)

    def _connected(self) -> socket.socket:
        if self._conn is None:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.settimeout(self.timeout_s)
                conn.connect(socket_name(self.link_id))
                if not _same_user(conn):
                    # A reply is a pickle too: a name taken by another user's process (an
                    # abstract socket is free again once its server dies) is never read from.
                    raise PermissionError(f"the process serving {self.name}'s socket runs as "
                                          f"user {_peer_uid(conn)}, not {os.getuid()}: refused, "
                                          f"nothing sent")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        """Forget the connection: after an error its next bytes cannot be trusted."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()


def peer_for(handle, name: str, address: tuple, serves: bool, here: str,
             timeout_s: float = CALL_TIMEOUT_S, knob: str = KNOB) -> Peer:
    """The way to call the process at link ``address`` (id, node, GPU) from node ``here``:
    its socket when it ``serves`` one on this node, else Ray."""
    return Peer(handle, name, address[0] if serves and address[1] == here else None, timeout_s,
                knob)


class Pending:
    """A request in flight; ``result`` returns its reply or raises what the peer raised,
    ``PeerLost`` when the peer died, ``PeerStuck`` when it did not answer by the deadline."""

    def __init__(self, peer: Peer, method: str, ref=None, conn: socket.socket | None = None,
                 timeout_s: float = CALL_TIMEOUT_S):
        self.peer, self.method, self.ref, self.conn = peer, method, ref, conn
        self.timeout_s = timeout_s

    def _stuck(self) -> PeerStuck:
        return PeerStuck(f"{self.peer.name} did not answer {self.method} within "
                         f"{self.timeout_s:g}s ({self.peer.knob})")

    def result(self):
        peer = self.peer
        if self.conn is None:
            try:
                return ray.get(self.ref, timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError as err:
                raise self._stuck() from err
            except ray.exceptions.RayActorError as err:
                raise PeerLost(f"{peer.name} died during {self.method}: "
                               f"{type(err).__name__}") from err
        try:
            reply = _recv(self.conn)
            if reply is _CLOSED:
                peer._drop()
                raise PeerLost(f"{peer.name} died during {self.method} (its socket closed)")
        except socket.timeout as err:
            peer._drop()
            raise self._stuck() from err
        except (OSError, EOFError) as err:
            peer._drop()
            raise PeerLost(f"{peer.name} died during {self.method}: {err!r}") from err
        except BaseException:
            peer._drop()
            raise
        finally:
            peer._lock.release()
        ok, value = reply
        if not ok:
            lost, text = value
            if lost:  # what the peer lost names the culprit; its traceback adds nothing
                what = text.splitlines()[0].split(": ", 1)[-1]
                raise PeerLost(f"{what} (reported by {peer.name}, in {self.method})")
            raise RemoteError(f"{peer.name} failed in {self.method}: {text}")
        return value


def wait_for(refs, what: str, timeout_s: float = CALL_TIMEOUT_S, knob: str = KNOB):
    """``ray.get`` with a deadline, for the calls a step waits on: a dead actor raises
    ``PeerLost`` and one that does not answer in time ``PeerStuck``, both naming ``what``
    (and ``PeerStuck`` the ``knob`` that sets the deadline)."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as err:
        raise PeerStuck(f"{what}: no answer within {timeout_s:g}s ({knob})") from err
    except ray.exceptions.RayActorError as err:
        raise PeerLost(f"{what}: an actor died ({type(err).__name__}: {err})") from err


def results(pendings: dict) -> tuple[dict, tuple | None]:
    """Every reply of ``pendings`` (key -> Pending), all read even when one fails, so that no
    connection is left with an unread reply: (key -> reply, (key, error) of the first
    failure or None)."""
    out, failed = {}, None
    for key, pending in pendings.items():
        try:
            out[key] = pending.result()
        except Exception as err:  # read the others first
            failed = failed or (key, err)
    return out, failed

