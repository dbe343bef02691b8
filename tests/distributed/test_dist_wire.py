"""The transport (distributed/wire.py): messages through shared memory and the object-store
form, without Ray."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from expertpar.distributed.wire import ALIGN, Inbox, Outbox, Packet, shm_dir, sweep_dead


def tensors():
    return [torch.arange(12, dtype=torch.float32).reshape(3, 4),
            torch.tensor([0, 1, 1], dtype=torch.int64),
            torch.zeros(0, 4),  # an expert with no rows
            torch.full((2, 5), 7, dtype=torch.bfloat16)]


@pytest.mark.parametrize("shared", [True, False])
def test_a_message_comes_back_equal_in_one_aligned_buffer(shared):
    box, inbox = Outbox(shared=shared), Inbox()
    message = box.pack(tensors())
    packet = Packet(*message)
    assert (packet.path is not None) == shared and (packet.inline is not None) == (not shared)
    assert all(offset % ALIGN == 0 for offset, _, _ in packet.specs)
    for got, want in zip(inbox.unpack(message), tensors()):
        assert got.dtype == want.dtype and torch.equal(got, want)
    box.close()


def test_the_receiver_reads_the_senders_buffer_in_place():
    box, inbox = Outbox(shared=True), Inbox()
    message = box.pack([torch.ones(4)])
    (view,) = inbox.unpack(message)
    # Mapped at both ends, the file's name is gone: a killed process leaves nothing behind.
    assert not os.path.exists(Packet(*message).path)
    box.pack([torch.full((4,), 5.0)])  # the next message reuses the buffer...
    assert torch.equal(view, torch.full((4,), 5.0))  # ...which is why receivers copy to keep
    box.close()


def test_a_bigger_message_grows_the_buffer_into_a_new_file_and_removes_the_old():
    box, inbox = Outbox(shared=True), Inbox()
    small = Packet(*box.pack([torch.ones(10)]))
    big_t = torch.arange(1 << 19, dtype=torch.float32)  # 2 MiB > the first 1 MiB buffer
    big = box.pack([big_t])
    assert Packet(*big).path != small.path and not os.path.exists(small.path)
    assert torch.equal(inbox.unpack(big)[0], big_t)
    assert torch.equal(inbox.unpack(box.pack([big_t * 2]))[0], big_t * 2)  # mapped once
    box.close()
    assert not os.path.exists(Packet(*big).path)


def test_a_full_shared_memory_falls_back_to_the_object_store(monkeypatch):
    box = Outbox(shared=True)

    def no_space(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.warns(RuntimeWarning, match="EXPERTPAR_SHM_DIR"):
        message = box.pack([torch.ones(3)])
    assert Packet(*message).path is None and not box.shared
    assert torch.equal(Inbox().unpack(message)[0], torch.ones(3))
    assert not [n for n in os.listdir(shm_dir()) if box._stem in n]  # nothing half-made left


def test_buffers_of_dead_processes_are_swept_and_live_ones_kept():
    code = ("import torch; from expertpar.distributed.wire import Outbox, Packet, _LIVE; "
            "b = Outbox(True); print(Packet(*b.pack([torch.ones(3)])).path); "
            "_LIVE.clear()")  # as if killed: its exit handler removes nothing
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=os.environ).stdout.strip()
    assert os.path.exists(dead)
    mine = Outbox(shared=True)
    live = Packet(*mine.pack([torch.ones(3)])).path
    removed = [str(p) for p in sweep_dead()]
    assert dead in removed and live not in removed
    assert not os.path.exists(dead) and os.path.exists(live)
    mine.close()


def test_the_buffer_directory_is_the_environments(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTPAR_SHM_DIR", str(tmp_path))
    box = Outbox(shared=True)
    assert Packet(*box.pack([torch.ones(1)])).path.startswith(str(tmp_path))
    box.close()
    assert isinstance(Packet(*Outbox(shared=False).pack([torch.ones(1)])).inline, np.ndarray)


def test_host_tensors_towards_a_gpu_peer_go_through_shared_memory():
    # A peer that advertises a GPU gets a GPU message only when the tensors are on that GPU.
    box, inbox = Outbox(shared=True, gpu="GPU-0000"), Inbox()
    packet = Packet(*box.pack(tensors()))
    assert packet.ipc is None and packet.path is not None
    assert all(torch.equal(a, b) for a, b in zip(inbox.unpack(tuple(packet)), tensors()))
    box.close()
    # No shared memory (another node): no GPU path either.
    assert Outbox(shared=False, gpu="GPU-0000").gpu is None
