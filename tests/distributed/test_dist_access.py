"""Who may reach the expert actors' call sockets and shared buffers: this user's processes only
(distributed/calls.py, distributed/wire.py; no Ray). A call and its reply are pickles, and
unpickling runs code, so neither end reads from a process of another user."""
from __future__ import annotations

import os
import pickle
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from expertpar.distributed import calls, wire
from expertpar.distributed.calls import CallServer, Peer, PeerLost, socket_name
from expertpar.distributed.wire import Inbox, Outbox, Packet, sweep_dead

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


class Echo:
    def __init__(self):
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


@pytest.fixture
def open_umask():
    """The most permissive umask: whatever is private is so by the code's own doing."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_shared_buffers_are_this_users_alone_whatever_the_umask(open_umask):
    box = Outbox(shared=True)
    path = Packet(*box.pack([torch.ones(3)])).path
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    box.close()


def test_a_socket_file_is_this_users_alone_whatever_the_umask(open_umask, monkeypatch):
    # Linux: an abstract socket, no file at all (who calls is checked by SO_PEERCRED) ...
    link = uuid.uuid4().hex[:12]
    assert socket_name(link).startswith("\0")
    # ... elsewhere a socket file in the temporary directory, mode 0600.
    monkeypatch.setattr(calls.sys, "platform", "darwin")
    server = CallServer(Echo(), link, {"forward"})
    try:
        st = os.stat(server.name)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert Peer(None, "echo", link).call("forward", 7) == 7
    finally:
        server.close()
    assert not os.path.exists(server.name)


class _Payload:
    """Unpickling this makes a directory: proof that a reply was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@as_root
def test_a_caller_never_reads_a_reply_from_another_users_socket(tmp_path):
    # Another user takes the name of an expert actor's socket (an abstract name is free again
    # once its server is gone) and answers every caller with a pickle that runs code.
    link, marker = uuid.uuid4().hex[:12], tmp_path / "unpickled"
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
                listener.bind(socket_name(link))
                listener.listen(1)
                os.write(ready_w, b"r")
                listener.settimeout(10)
                conn, _ = listener.accept()
                payload = pickle.dumps((True, _Payload(str(marker))))
                conn.settimeout(2)
                try:
                    conn.sendall(calls._HEADER.pack(len(payload)) + payload)
                    got = conn.recv(1 << 16)  # b"": the caller hung up without a word
                except OSError:
                    got = b""
                os.write(ready_w, b"%d" % len(got))
        finally:
            os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"r"
    with pytest.raises(PeerLost, match=f"runs as user {NOBODY}.*refused, nothing sent"):
        Peer(None, "expert actor 0", link).call("forward", 1)
    os.waitpid(pid, 0)
    assert os.read(ready_r, 100) == b"0"  # the request never reached it
    os.close(ready_r)
    assert not marker.exists()  # its reply was never unpickled


def test_a_message_naming_a_file_that_is_not_this_users_buffer_is_refused(tmp_path):
    # The receiver maps the file a message names and then removes it: it must be a wire
    # buffer of this user, private to it, or neither happens.
    victim = tmp_path / "results.csv"
    victim.write_text("keep me")
    leaky = tmp_path / f"{wire.PREFIX}-{os.getpid()}-abc-1"
    leaky.write_bytes(bytes(64))
    leaky.chmod(0o644)
    for path in (victim, leaky):
        with pytest.raises(PermissionError, match="not a shared buffer of this user"):
            Inbox().unpack(tuple(Packet(((0, "uint8", (4,)),), 4, path=str(path))))
        assert path.exists()
    if os.geteuid() == 0:
        theirs = tmp_path / f"{wire.PREFIX}-{os.getpid()}-def-1"
        theirs.write_bytes(bytes(64))
        theirs.chmod(0o600)
        os.chown(theirs, NOBODY, NOBODY)
        with pytest.raises(PermissionError, match=f"owner uid {NOBODY}"):
            Inbox().unpack(tuple(Packet(((0, "uint8", (4,)),), 4, path=str(theirs))))
        assert theirs.exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_sweep_removes_only_this_users_buffers_and_never_fails(tmp_path, monkeypatch):
    pid = _dead_pid()
    mine = tmp_path / f"{wire.PREFIX}-{pid}-mine-1"
    mine.write_bytes(b"x")
    theirs = tmp_path / f"{wire.PREFIX}-{pid}-theirs-1"
    theirs.write_bytes(b"x")
    if os.geteuid() == 0:
        os.chown(theirs, NOBODY, NOBODY)
    else:
        theirs.unlink()
    assert sweep_dead(tmp_path) == [mine]
    assert not mine.exists() and (os.geteuid() != 0 or theirs.exists())
    # A buffer that cannot be removed here (in a sticky /dev/shm, another user's whose owner
    # the check could not see) is left, and the sweep goes on.
    stuck = tmp_path / f"{wire.PREFIX}-{pid}-stuck-1"
    stuck.write_bytes(b"x")

    def refuse(self, missing_ok=False):
        raise PermissionError(1, "Operation not permitted", str(self))
    monkeypatch.setattr(Path, "unlink", refuse)
    assert sweep_dead(tmp_path) == []
