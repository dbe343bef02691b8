"""Moving tensors between processes: shared memory on one node, Ray's object store across nodes.

A Ray call carries a small ``Packet`` instead of tensors. The sender's ``Outbox`` copies every
tensor of one message into one contiguous buffer: a shared-memory file that the receiver maps
once and reads in place when both processes share a node, or one numpy array that travels
through Ray's object store otherwise. Measured here: a 1.2 MB actor echo costs 5.5 ms through
the object store and 2.6 ms through shared memory (an empty call costs 0.5-1 ms), and the
reference layer's 201 MB per step move at 0.6 of memcpy speed (``expertpar bench``).

The receiver removes a buffer's file name as soon as it has mapped it (the memory stays while
either end maps it), so a killed process leaves nothing in /dev/shm; only a buffer no receiver
ever mapped can outlive its creator, and ``sweep_dead`` removes those.

Between two processes that use the same GPU (expert actors sharing it, a router or a train
worker beside them) a message whose tensors are on that GPU stays there: the sender's buffer is
device memory, shared once per buffer through a CUDA IPC handle that the receiver opens once,
and ``pack`` returns only when the copies into it are done.

The rule that makes it safe: a message lives in its sender's outbox until that outbox sends the
next one. Calls between two processes are request/reply, so a request is read before the reply
is sent and a reply is read before the caller's next request. What a receiver keeps beyond that
(activations saved for backward) it copies; what it receives it never writes into. On a GPU,
"read" means the kernels that read it have finished: ``pack`` waits for the device before it
returns, so a reply is never sent while a read of the request is still queued.
"""
from __future__ import annotations

import atexit
import os
import re
import stat
import tempfile
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

ALIGN = 64  # bytes: every tensor starts on a cache line
PREFIX = "expertpar-wire"
_NAME = re.compile(rf"^{PREFIX}-(\d+)-")


# A message as it travels: plain tuples, which Ray pickles in microseconds (a dataclass or a
# torch tensor in a call's arguments costs it about 0.5-1 ms more, measured here).
Address = tuple[str, str, str]  # a link's (id, Ray node id, GPU UUID or "")
TensorSpec = tuple[int, str, tuple[int, ...]]  # (byte offset, torch dtype name, shape)


class Packet(NamedTuple):
    """One message: how to cut it, its size, and where its bytes are (a shared file, a GPU
    buffer, or ``inline``). Sent as a plain tuple (``tuple(packet)``), rebuilt with
    ``Packet(*t)``."""
    specs: tuple[TensorSpec, ...]
    nbytes: int
    path: str | None = None  # shared-memory file holding the message (or the GPU buffer's name)
    inline: np.ndarray | None = None  # the message itself, through the object store
    ipc: tuple | None = None  # (GPU UUID, CUDA IPC handle of the buffer): the message is there


def gpu_uuid(device: torch.device | int) -> str:
    """A GPU's identity across processes (their device indices differ with
    CUDA_VISIBLE_DEVICES)."""
    index = device if isinstance(device, int) else device.index
    return str(torch.cuda.get_device_properties(
        torch.cuda.current_device() if index is None else index).uuid)


def _local_gpu(uuid: str) -> int:
    for index in range(torch.cuda.device_count()):
        if gpu_uuid(index) == uuid:
            return index
    raise RuntimeError(f"wire: a peer sent a message on GPU {uuid}, which this process does not "
                       f"see (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")


def shm_dir() -> Path:
    """Where shared buffers live: $EXPERTPAR_SHM_DIR, else /dev/shm (RAM), else the temp dir."""
    if os.environ.get("EXPERTPAR_SHM_DIR"):
        return Path(os.environ["EXPERTPAR_SHM_DIR"])
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _layout(tensors: Sequence[torch.Tensor]) -> tuple[tuple[TensorSpec, ...], int]:
    specs, offset = [], 0
    for t in tensors:
        specs.append((offset, str(t.dtype).removeprefix("torch."), tuple(t.shape)))
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return tuple(specs), offset


def _views(buffer_U8: torch.Tensor, specs: Sequence[TensorSpec]) -> list[torch.Tensor]:
    out = []
    for offset, dtype_name, shape in specs:
        dtype = getattr(torch, dtype_name)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out.append(buffer_U8[offset:offset + n].view(dtype).view(shape))
    return out


def _grown(buffer_U8: torch.Tensor | None, nbytes: int) -> int:
    """A new buffer's size: room for the message, at least 1 MiB, at least twice the old."""
    return max(1 << 20, nbytes, 2 * (0 if buffer_U8 is None else buffer_U8.numel()))


class Outbox:
    """A sender's buffer towards one receiver. ``shared`` when the receiver is on this node;
    ``gpu``: the UUID of the receiver's GPU, when it has one and may receive on it."""

    def __init__(self, shared: bool, gpu: str | None = None):
        self.shared = shared
        self.gpu = gpu if shared else None
        self._path: Path | None = None
        self._buffer_U8: torch.Tensor | None = None
        self._generation = 0
        self._stem = f"{PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:10]}"
        self._device_U8: torch.Tensor | None = None
        self._handle: tuple | None = None
        self._device_generation = 0

    def pack(self, tensors: Sequence[torch.Tensor]) -> tuple:
        """One message of ``tensors`` (a plain-tuple ``Packet``); it stays valid until this
        outbox packs the next one."""
        specs, nbytes = _layout(tensors)
        device = self._same_gpu(tensors)
        if device is not None:
            buffer_U8 = self._device_buffer(nbytes, device)
            for view, t in zip(_views(buffer_U8, specs), tensors):
                view.copy_(t.detach())  # device to device (host tensors, e.g. norms: uploaded)
            packet = Packet(specs, nbytes, path=f"{self._stem}-cuda{self._device_generation}",
                            ipc=(self.gpu, self._handle))
            # The copies above, and every kernel that read the message this one answers.
            torch.cuda.synchronize(device)
            return tuple(packet)
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # reads of a GPU message being answered are done
        if self.shared:
            try:
                buffer_U8 = self._buffer(nbytes)
            except OSError as err:  # a full /dev/shm: say so once, then use the object store
                warnings.warn(f"shared-memory transport off for this link ({err}); set "
                              f"EXPERTPAR_SHM_DIR to a larger tmpfs or experts.shared_memory: "
                              f"false", RuntimeWarning, stacklevel=2)
                self.shared = False
            else:
                for view, t in zip(_views(buffer_U8, specs), tensors):
                    view.copy_(t.detach())
                return tuple(Packet(specs, nbytes, path=str(self._path)))
        flat_U8 = torch.empty(nbytes, dtype=torch.uint8)
        for view, t in zip(_views(flat_U8, specs), tensors):
            view.copy_(t.detach())
        return tuple(Packet(specs, nbytes, inline=flat_U8.numpy()))

    def _buffer(self, nbytes: int) -> torch.Tensor:
        if self._buffer_U8 is not None and self._buffer_U8.numel() >= nbytes:
            return self._buffer_U8
        size = _grown(self._buffer_U8, nbytes)
        self._generation += 1
        path = shm_dir() / f"{self._stem}-{self._generation}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            # Reserve the pages now: a tmpfs that runs out later raises SIGBUS, not an error.
            os.posix_fallocate(fd, 0, size)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._drop_file()  # the receiver keeps its mapping of the old one until it sees this
        self._path, self._buffer_U8 = path, torch.from_file(str(path), shared=True, size=size,
                                                            dtype=torch.uint8)
        _LIVE.add(path)
        return self._buffer_U8

    def _same_gpu(self, tensors: Sequence[torch.Tensor]) -> torch.device | None:
        """The GPU this message can stay on: the receiver's, holding every CUDA tensor of it."""
        if self.gpu is None:
            return None
        devices = {t.device for t in tensors if t.is_cuda}
        if len(devices) != 1:
            return None
        (device,) = devices
        return device if gpu_uuid(device) == self.gpu else None

    def _device_buffer(self, nbytes: int, device: torch.device) -> torch.Tensor:
        if (self._device_U8 is not None and self._device_U8.numel() >= nbytes
                and self._device_U8.device == device):
            return self._device_U8
        self._device_generation += 1
        self._device_U8 = torch.empty(_grown(self._device_U8, nbytes), dtype=torch.uint8,
                                      device=device)
        # The handle names the buffer's device allocation; the receiver opens it once. Torch
        # keeps a shared allocation alive until every process that opened it lets go.
        self._handle = self._device_U8.untyped_storage()._share_cuda_()[1:]
        return self._device_U8

    def _drop_file(self) -> None:
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            _LIVE.discard(self._path)
        self._path, self._buffer_U8 = None, None

    def close(self) -> None:
        self._drop_file()
        self._device_U8, self._handle = None, None


class Inbox:
    """A receiver's mappings of its senders' shared buffers (one per file, kept while used)."""

    def __init__(self):
        self._maps: dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()

    def unpack(self, message: tuple) -> list[torch.Tensor]:
        """Views of the message's tensors: read them, copy what you keep, never write."""
        packet = Packet(*message)
        if packet.ipc is not None:
            return _views(self._open_device_buffer(packet), packet.specs)
        if packet.path is None:
            with warnings.catch_warnings():
                # Object-store arrays are read-only; nothing here writes into them.
                warnings.simplefilter("ignore", UserWarning)
                flat_U8 = torch.from_numpy(packet.inline)
            return _views(flat_U8, packet.specs)
        return _views(self._mapped(packet.path, lambda: _map_file(packet.path)), packet.specs)

    def _open_device_buffer(self, packet: Packet) -> torch.Tensor:
        return self._mapped(packet.path, lambda: _open_ipc(*packet.ipc))

    def _mapped(self, name: str, open_buffer) -> torch.Tensor:
        """The buffer called ``name``, opened once; a sender's newer buffer (its next
        generation) replaces the older one, which is let go."""
        with self.lock:
            buffer_U8 = self._maps.get(name)
            if buffer_U8 is None:
                stem = name.rsplit("-", 1)[0]
                for old in [p for p in self._maps if p.rsplit("-", 1)[0] == stem]:
                    del self._maps[old]
                buffer_U8 = self._maps[name] = open_buffer()
        return buffer_U8

    def close(self) -> None:
        with self.lock:
            self._maps.clear()


def _map_file(path: str) -> torch.Tensor:
    _check_buffer(path)
    buffer_U8 = torch.from_file(path, shared=True, size=os.path.getsize(path), dtype=torch.uint8)
    # Both ends have it mapped now, so the name can go: the memory lives as long as a mapping
    # does, and nothing is left behind if either process is killed.
    Path(path).unlink(missing_ok=True)
    return buffer_U8


def _check_buffer(path: str) -> None:
    """Map (and then remove) only what a sender of this user made: a wire buffer, this user's,
    readable by no one else. A message naming any other file is refused before it is opened."""
    st = os.stat(path, follow_symlinks=False)
    if (_NAME.match(os.path.basename(path)) is None or not stat.S_ISREG(st.st_mode)
            or st.st_uid != os.getuid() or st.st_mode & 0o077):
        raise PermissionError(f"wire: {path} is not a shared buffer of this user (owner uid "
                              f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): refused")


def _open_ipc(gpu: str, handle: tuple) -> torch.Tensor:
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(_local_gpu(gpu), *handle)
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


_LIVE: set[Path] = set()


@atexit.register
def _unlink_live() -> None:
    for path in list(_LIVE):
        path.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this node (one not ours to signal still does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead(directory: Path | None = None) -> list[Path]:
    """Remove shared buffers whose creating process is gone (killed actors cannot clean up)."""
    directory = directory or shm_dir()
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _NAME.match(name)
        if m is None:
            continue
        if process_alive(int(m.group(1))):
            continue
        path = directory / name
        try:
            if path.lstat().st_uid != os.getuid():
                continue  # another user's (in a shared /dev/shm): not ours to remove
            path.unlink()
        except OSError:  # gone meanwhile, or not removable here: nothing to sweep
            continue
        removed.append(path)
    return removed


def node_id() -> str:
    """This process's Ray node (which decides whether shared memory can reach a peer)."""
    import ray
    return ray.get_runtime_context().get_node_id()


class Links:
    """This process's end of every link: one outbox per peer it sends to, one inbox.

    A peer's address is (link id, Ray node id, GPU UUID or ""); towards peers on this node,
    with ``shared_memory`` on, messages go through shared memory, or stay on the GPU when both
    ends use the same one; otherwise through the object store. ``device``: where this process
    computes (its GPU is advertised so that peers may send there).
    """

    def __init__(self, shared_memory: bool, device: torch.device | str = "cpu"):
        self.shared_memory = shared_memory
        self.id = uuid.uuid4().hex[:12]
        self.node = node_id()
        device = torch.device(device)
        self.gpu = gpu_uuid(device) if device.type == "cuda" else ""
        self.inbox = Inbox()
        self._outboxes: dict[str, Outbox] = {}
        self._lock = threading.Lock()
        self.meter = Meter()

    @property
    def address(self) -> Address:
        return (self.id, self.node, self.gpu)

    def outbox(self, peer: Address) -> Outbox:
        with self._lock:
            box = self._outboxes.get(peer[0])
            if box is None:
                box = Outbox(shared=self.shared_memory and peer[1] == self.node,
                             gpu=peer[2] or None)
                self._outboxes[peer[0]] = box
            return box

    def close(self) -> None:
        with self._lock:
            for box in self._outboxes.values():
                box.close()
            self._outboxes.clear()
        self.inbox.close()


@dataclass
class Meter:
    """Bytes a link moved and the seconds spent moving them (round trip minus the peer's work),
    for ``expertpar bench``. Added to by the router's threads, taken by another call."""
    nbytes: int = 0
    seconds: float = 0.0
    calls: int = 0
    gpu_bytes: int = 0  # of nbytes, those that stayed on a GPU
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, nbytes: int, seconds: float, calls: int = 1, gpu_bytes: int = 0) -> None:
        with self.lock:
            self.nbytes += nbytes
            self.seconds += max(0.0, seconds)
            self.calls += calls
            self.gpu_bytes += gpu_bytes

    def take(self) -> dict:
        with self.lock:
            out = {"bytes": self.nbytes, "seconds": self.seconds, "calls": self.calls,
                   "gpu_bytes": self.gpu_bytes}
            self.nbytes, self.seconds, self.calls, self.gpu_bytes = 0, 0.0, 0, 0
        return out


def gpu_bytes(*messages: tuple) -> int:
    """Bytes of the messages that stay on a GPU (for the meter)."""
    packets = [Packet(*m) for m in messages]
    return sum(p.nbytes for p in packets if p.ipc is not None)
