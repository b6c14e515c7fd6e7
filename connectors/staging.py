"""Reusable host buffers that loaded offload blocks land in before they are
copied into the device pool.

A fresh 100 MB tensor is fresh mmap'd memory: touching it page by page cost
more than the copies themselves on every load (glibc serves allocations over
32 MB with mmap and returns them to the kernel on free). Buffers here are
kept, so only the first load of a size pays for that.
"""
from __future__ import annotations

import threading

import torch


class StagingBuffers:
    def __init__(self, block_shape: tuple[int, ...], dtype: torch.dtype, keep_bytes: int = 512 << 20,
                 pin: bool = False) -> None:
        self.block_shape = block_shape
        self.dtype = dtype
        self.pin = pin  # pinned host memory: the device pool is on CUDA
        self.keep_bytes = keep_bytes  # free buffers kept up to this size in all; the smallest go first
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def acquire(self, n: int) -> torch.Tensor:
        """A buffer of at least n blocks; give it back with release()."""
        with self._lock:
            fitting = [i for i, b in enumerate(self._free) if b.shape[0] >= n]
            if fitting:  # the smallest that fits (tensors compare elementwise: go by position)
                return self._free.pop(min(fitting, key=lambda i: self._free[i].shape[0]))
        # Rounded up to a power of two: a conversation's loads grow turn by turn,
        # and each new size would otherwise be a new buffer.
        return torch.empty((1 << (n - 1).bit_length(), *self.block_shape), dtype=self.dtype, pin_memory=self.pin)

    @property
    def rows_per_block(self) -> int:
        """Pages (device blocks) in one offload block."""
        return self.block_shape[0]

    def release(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)
            self._free.sort(key=lambda b: b.shape[0], reverse=True)
            kept = 0
            for i, b in enumerate(self._free):
                kept += b.nbytes
                if kept > self.keep_bytes:
                    del self._free[i:]
                    break
