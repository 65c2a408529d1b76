"""Reusable host (pinned where CUDA exists) buffers for swapped activations.

Pinned allocation is slow (it pins pages), so buffers are kept and reused across steps: once the plan
is stable, every step acquires exactly the buffers the previous one released and the pool stops
growing. Each buffer may carry a CUDA event of the last copy that used it; reuse waits on it, so a
buffer is never overwritten while an asynchronous copy still reads it.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

_ALIGN = 4096


def _round(nbytes: int) -> int:
    return max(_ALIGN, (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN)


class HostBufferPool:
    def __init__(self, pin_memory: bool | None = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._free: dict[int, list[tuple[torch.Tensor, Any]]] = {}
        self._lock = threading.Lock()  # released from autograd worker threads
        self.num_buffers = 0
        self.total_bytes = 0
        self.in_use = 0

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 host buffer of at least ``nbytes`` bytes."""
        size = _round(nbytes)
        with self._lock:
            lst = self._free.get(size)
            item = lst.pop() if lst else None
            self.in_use += 1
        if item is not None:
            buf, event = item
            if event is not None:
                event.synchronize()
            return buf
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin_memory)
        with self._lock:
            self.num_buffers += 1
            self.total_bytes += size
        return buf

    def release(self, buf: torch.Tensor, event: Any = None) -> None:
        with self._lock:
            self._free.setdefault(buf.numel(), []).append((buf, event))
            self.in_use -= 1

    def clear(self) -> None:
        """Drop free buffers (e.g. after a re-plan changes the sizes needed)."""
        with self._lock:
            for lst in self._free.values():
                for buf, event in lst:
                    if event is not None:
                        event.synchronize()
                    self.num_buffers -= 1
                    self.total_bytes -= buf.numel()
            self._free.clear()
