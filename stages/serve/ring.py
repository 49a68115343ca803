"""Video frames from a core (stages/serve/core.py) to the server through shared memory, not the pipe.

A chunk at 960x544 is 6 MB per 4 frames. Pickled through the core's pipe it cost, on the 2-core dev VM,
~15 ms of the core's CPU and ~5 ms of the server's per chunk (copies into pickle bytes, through the
kernel's pipe buffer in 64 KB pieces, out again); through this ring ~1.5 ms and ~0.6 ms (one copy in, one
copy out). The core writes each chunk's frames into a ring of bytes in one shared-memory segment and sends
only a Slot (where they lie) in its chunk message; the server copies them out, in message order, and
stores how far it has read in the segment's header, which is how the core knows the space is free again.

The segment is made by the core once it knows its largest chunk (after calibration), sized for two full
batches and capped at half of what /dev/shm has free (containers often give it 64 MB; writing past a full
/dev/shm is a SIGBUS, not an error); when not even one chunk fits, or the server falls behind for
WAIT_S, frames go through the pipe as before. The core unlinks the segment when it ends; the server only
maps it. (A core that dies leaves the name to multiprocessing's resource tracker, which removes it when
the server ends.)
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

HEADER = 64                 # bytes: the server's read position (int64), then padding
WAIT_S = 10.0               # the core waits this long for space before sending a chunk through the pipe
MIN_BYTES = 16 << 20


@dataclass(frozen=True)
class Slot:
    """Where a chunk's frames lie in the ring: `start` counts bytes written since the ring was made."""
    start: int
    shape: tuple
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


class FrameRing:
    def __init__(self, shm: shared_memory.SharedMemory, owner: bool):
        self.shm, self.owner = shm, owner
        self.capacity = shm.size - HEADER
        self.read = np.ndarray((1,), np.int64, shm.buf, 0)       # the server's read position (bytes, absolute)
        self.written = 0                                          # the core's write position

    @property
    def name(self) -> str:
        return self.shm.name

    @classmethod
    def create(cls, chunk_bytes: int, chunks: int) -> "FrameRing | None":
        """A ring for `chunks` chunks of at most `chunk_bytes` (at least MIN_BYTES), capped at half of /dev/shm's
        free space; None when not one chunk fits there."""
        want = max(MIN_BYTES, chunk_bytes * chunks)
        try:
            free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else want
        except OSError:
            free = 0
        size = min(want, free // 2)
        if size < chunk_bytes:
            return None
        try:
            shm = shared_memory.SharedMemory(create=True, size=size + HEADER)
        except OSError:
            return None
        shm.buf[:HEADER] = bytes(HEADER)
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> "FrameRing":
        """The server's mapping of a core's ring. (Spawned cores share the server's resource tracker, which keeps
        a set of names: attaching registers the name again, a no-op; the core's unlink unregisters it.)"""
        return cls(shared_memory.SharedMemory(name=name), owner=False)

    # -- the core's side
    def put(self, a: np.ndarray) -> Slot | None:
        """Copy `a` into the ring once the server has read far enough (wrapping to the start when it does not
        fit before the end); None when it cannot: larger than the ring, or the server read nothing for WAIT_S."""
        n = a.nbytes
        if n > self.capacity:
            return None
        start = self.written
        if start % self.capacity + n > self.capacity:            # skip the ring's tail: a chunk lies in one piece
            start += self.capacity - start % self.capacity
        deadline = time.monotonic() + WAIT_S
        while start + n - int(self.read[0]) > self.capacity:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.001)
        pos = HEADER + start % self.capacity
        np.ndarray(a.shape, a.dtype, self.shm.buf, pos)[...] = a
        self.written = start + n
        return Slot(start, tuple(a.shape), a.dtype.str)

    # -- the server's side
    def take(self, slot: Slot) -> np.ndarray:
        """A copy of the slot's frames; the space up to its end is free for the core again. Slots are taken
        in the order the core wrote them."""
        pos = HEADER + slot.start % self.capacity
        out = np.ndarray(slot.shape, np.dtype(slot.dtype), self.shm.buf, pos).copy()
        self.read[0] = slot.start + slot.nbytes
        return out

    def close(self) -> None:
        self.read = None                                          # the view holds the buffer: drop it first
        try:
            self.shm.close()
        except BufferError:                                       # a view still alive somewhere: left to exit
            return
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
