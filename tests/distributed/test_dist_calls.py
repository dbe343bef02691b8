"""The call channel (distributed/calls.py): request/reply over a Unix socket, without Ray."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from expertpar.distributed.calls import (CallServer, Peer, PeerLost, PeerStuck, RemoteError,
                                         results)


class Echo:
    def __init__(self):
        self.seen = []

    def forward(self, x, *, scale=1):
        self.seen.append(threading.current_thread().name)
        return [v * scale for v in x]

    def backward(self, seconds):
        time.sleep(seconds)
        return seconds

    def fail(self):
        raise ValueError("bad rows in layer 3")

    def lose(self):
        raise PeerLost("expert actor 3 died during forward")

    def secret(self):
        return "not served"


@pytest.fixture
def served():
    target, link = Echo(), uuid.uuid4().hex[:12]
    server = CallServer(target, link, {"forward", "backward", "fail", "lose"})
    yield target, link
    server.close()


def test_a_call_returns_the_methods_value_computed_on_the_servers_thread(served):
    target, link = served
    peer = Peer(None, "echo", link)
    assert peer.call("forward", (1, 2, 3), scale=2) == [2, 4, 6]
    assert peer.call("forward", (5,)) == [5]  # the connection is reused
    assert target.seen == ["expertpar-call", "expertpar-call"]
    peer.close()


def test_requests_to_two_peers_run_at_once(served):
    _, link = served
    other = uuid.uuid4().hex[:12]
    server = CallServer(Echo(), other, {"backward"})
    try:
        a, b = Peer(None, "a", link), Peer(None, "b", other)
        t0 = time.perf_counter()
        got, failed = results({0: a.request("backward", 0.3), 1: b.request("backward", 0.3)})
        assert time.perf_counter() - t0 < 0.55  # not 0.6: both slept at the same time
        assert got == {0: 0.3, 1: 0.3} and failed is None
    finally:
        server.close()


def test_what_the_method_raised_reaches_the_caller_with_its_traceback(served):
    _, link = served
    peer = Peer(None, "expert actor 1", link)
    with pytest.raises(RemoteError, match="expert actor 1 failed in fail: ValueError: bad "
                                          "rows in layer 3") as err:
        peer.call("fail")
    assert "Traceback" in str(err.value)
    assert peer.call("forward", (1,)) == [1]  # the connection still works after an error


def test_a_loss_the_server_met_stays_a_loss_for_the_caller(served):
    # The router lost an expert actor: the worker calling the router must see a loss (which
    # the job recovers from), not a bug (which it does not).
    _, link = served
    with pytest.raises(PeerLost, match=r"^expert actor 3 died during forward \(reported by "
                                       r"the router, in lose\)$"):
        Peer(None, "the router", link).call("lose")


def test_a_peer_that_does_not_answer_by_the_deadline_is_stuck(served):
    _, link = served
    # the message names what sets the deadline (a drop-in layer's: RayExperts')
    peer = Peer(None, "expert actor 2", link, timeout_s=0.3, knob="RayExperts(call_timeout_s)")
    t0 = time.perf_counter()
    with pytest.raises(PeerStuck, match=r"expert actor 2 did not answer backward within 0.3s "
                                        r"\(RayExperts\(call_timeout_s\)\)"):
        peer.call("backward", 5)
    assert time.perf_counter() - t0 < 3
    assert isinstance(PeerStuck("x"), PeerLost)  # a stuck peer is a loss


def test_a_method_not_served_is_refused(served):
    _, link = served
    with pytest.raises(RemoteError, match="'secret' is not served"):
        Peer(None, "echo", link).call("secret")


def test_no_server_is_a_clear_error_naming_the_peer():
    with pytest.raises(PeerLost, match="the router is unreachable"):
        Peer(None, "the router", uuid.uuid4().hex[:12]).call("forward", ())


def test_a_peer_killed_mid_call_is_reported_at_once_not_after_a_timeout(tmp_path):
    link = uuid.uuid4().hex[:12]
    script = textwrap.dedent(f"""
        import time
        from expertpar.distributed.calls import CallServer
        class Slow:
            def backward(self):
                time.sleep(60)
        server = CallServer(Slow(), {link!r}, {{"backward"}})
        print("ready", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout.readline().strip() == "ready"
        peer = Peer(None, "expert actor 0", link)
        pending = peer.request("backward")
        t0 = time.perf_counter()
        threading.Timer(0.3, proc.send_signal, (signal.SIGKILL,)).start()
        with pytest.raises(PeerLost, match="expert actor 0 died during backward"):
            pending.result()
        assert time.perf_counter() - t0 < 5
        with pytest.raises(PeerLost, match="expert actor 0 is unreachable"):
            peer.call("backward")  # and it stays lost
    finally:
        proc.kill()
        proc.wait()


def test_after_close_the_server_takes_no_more_calls():
    link = uuid.uuid4().hex[:12]
    server = CallServer(Echo(), link, {"forward"})
    peer = Peer(None, "echo", link)
    assert peer.call("forward", (1,)) == [1]
    server.close()
    with pytest.raises(PeerLost):
        peer.call("forward", (1,))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_a_process_of_another_user_cannot_call(served):
    # A call is a pickle, and unpickling runs code: the server hangs up on other users.
    target, link = served
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child becomes "nobody" and tries to call
        try:
            os.setuid(65534)
            try:
                Peer(None, "echo", link).call("forward", (1,))
                os.write(write_end, b"answered")
            except PeerLost:
                os.write(write_end, b"refused")
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    assert os.read(read_end, 100) == b"refused"
    os.close(read_end)
    assert target.seen == []  # the method never ran
    assert Peer(None, "echo", link).call("forward", (2,)) == [2]  # this user still can
