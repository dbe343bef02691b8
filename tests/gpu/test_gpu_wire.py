"""Messages that stay on the GPU: CUDA IPC between two processes using the same GPU."""
import multiprocessing as mp

import pytest
import torch

from expertpar.distributed.wire import Inbox, Outbox, Packet, gpu_uuid

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _echo_doubled(requests, replies):
    """Another process: open each message on the GPU, reply with it doubled, on the GPU."""
    inbox, box = Inbox(), Outbox(shared=True, gpu=gpu_uuid(0))
    while (message := requests.get()) is not None:
        replies.put(box.pack([2 * t for t in inbox.unpack(message)]))
    box.close()


def test_a_gpu_message_reaches_another_process_on_the_gpu_and_back():
    ctx = mp.get_context("spawn")
    requests, replies = ctx.Queue(), ctx.Queue()
    peer = ctx.Process(target=_echo_doubled, args=(requests, replies))
    peer.start()
    try:
        box, inbox = Outbox(shared=True, gpu=gpu_uuid(0)), Inbox()
        for n in (1000, 3_000_000):  # the second outgrows the first buffer
            x = torch.randn(n, device="cuda")
            norms = torch.arange(3.0)  # host tensors ride along, uploaded
            message = box.pack([x, norms])
            assert Packet(*message).ipc is not None
            requests.put(message)
            back, norms_back = inbox.unpack(replies.get(timeout=120))
            assert back.is_cuda and norms_back.is_cuda
            torch.testing.assert_close(back, 2 * x)
            torch.testing.assert_close(norms_back.cpu(), 2 * norms)
        box.close()
    finally:
        requests.put(None)
        peer.join(timeout=60)
    assert peer.exitcode == 0
