"""Moving saved activations to host memory and back, off the compute stream.

The swap engine decides *which* tensors move and *when* a prefetch starts; this module only moves them:

* offload: the tensor is copied into a reusable pinned host buffer on a device-to-host side stream. The
  copy stream first waits for the compute stream (the tensor must be written), the compute stream never
  waits for the copy, and ``record_stream`` keeps the device block alive until the copy is done;
* prefetch: a host-to-device side stream waits for the offload's event and copies the tensor back into a
  fresh device block, recording a ready event;
* wait: the compute stream waits on that event only when autograd actually unpacks the tensor.

Without CUDA the same calls copy synchronously into host buffers, so the logic runs (and is tested) on a
CPU. Copies are exact: gradients are bit-for-bit those of the run without swapping.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from callbacks.host_pool import HostBufferPool


class SwappedTensor:
    """What autograd holds instead of an offloaded tensor: its host copy and the events of both copies."""

    __slots__ = ("index", "host", "done", "ready", "dev", "shape", "stride", "dtype", "box", "__weakref__")

    def __init__(self, index: int, host: torch.Tensor, done: Any, shape, stride, dtype) -> None:
        self.index = index
        self.host = host
        self.done = done  # device-to-host copy event (CUDA) or None
        self.ready = None  # host-to-device copy event (CUDA) or None
        self.dev: torch.Tensor | None = None
        self.shape, self.stride, self.dtype = shape, stride, dtype
        self.box = [done]  # last event touching the host buffer, read by the pool on release


class SwapCopier:
    """Pinned host pool, one copy stream each way, and the handles of the tensors now on the host."""

    def __init__(self) -> None:
        self.pool = HostBufferPool()
        self._d2h: Any = None
        self._h2d: Any = None
        self.device = torch.device("cpu")
        self.begin_step(self.device)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def begin_step(self, device: torch.device) -> None:
        """Forget the previous step's handles and counts; create the streams on first CUDA use."""
        self.device = device
        if self.cuda and self._d2h is None:
            self._d2h, self._h2d = torch.cuda.Stream(device), torch.cuda.Stream(device)
        self.handles: weakref.WeakValueDictionary[int, SwappedTensor] = weakref.WeakValueDictionary()
        self.swapped_bytes = 0
        self.late = 0  # tensors unpacked before their prefetch was issued

    def offload(self, t: torch.Tensor, index: int) -> SwappedTensor:
        n = t.numel() * t.element_size()
        buf = self.pool.acquire(n)
        host = buf[:n].view(t.dtype).as_strided(t.shape, t.stride())
        if self.cuda:
            self._d2h.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._d2h):
                host.copy_(t, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._d2h)
            t.record_stream(self._d2h)
        else:
            host.copy_(t)
            done = None
        h = SwappedTensor(index, host, done, t.shape, t.stride(), t.dtype)
        weakref.finalize(h, self._release, buf, h.box)  # autograd dropped it: the buffer goes back
        self.handles[index] = h
        self.swapped_bytes += n
        return h

    def _release(self, buf: torch.Tensor, box: list) -> None:
        self.pool.release(buf, box[0])

    def prefetch(self, indices: Any) -> None:
        """Start copying these offloaded tensors back (those autograd still holds)."""
        for i in indices:
            h = self.handles.get(i)
            if h is not None:
                self._copy_back(h)

    def _copy_back(self, h: SwappedTensor) -> None:
        if h.dev is not None:
            return
        if self.cuda:
            with torch.cuda.stream(self._h2d):
                self._h2d.wait_event(h.done)
                dev = torch.empty_strided(h.shape, h.stride, dtype=h.dtype, device=self.device)
                dev.copy_(h.host, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._h2d)
            h.ready = ready
            h.box[0] = ready
        else:
            dev = torch.empty_strided(h.shape, h.stride, dtype=h.dtype, device=self.device)
            dev.copy_(h.host)
        h.dev = dev

    def unpack(self, obj: Any) -> torch.Tensor:
        """The device tensor for autograd: waits (on the compute stream) for its copy back only now."""
        if not isinstance(obj, SwappedTensor):
            return obj
        if obj.dev is None:
            self.late += 1
            self._copy_back(obj)
        if self.cuda:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(obj.ready)
            obj.dev.record_stream(cur)
        return obj.dev

    def close(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.pool.clear()
