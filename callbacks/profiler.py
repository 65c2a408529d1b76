"""Profiling for the swap planner: per-module compute time, saved-tensor bytes, transfer bandwidth.

One training step is recorded with ``saved_tensors_hooks`` (which tensor autograd keeps, when it is
packed and when backward first needs it) plus module forward hooks (a stack tells which module saved
it; forward time per module) and a gradient hook on each module's output (the moment that module's
backward starts: the points where prefetches can be issued). Output tensor hooks are used instead of
``register_full_backward_pre_hook`` because the latter wraps inputs in a custom Function and breaks
in-place ops such as ``ReLU(inplace=True)``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from callbacks.swap_model import Bandwidth, SavedRecord, StepProfile, Trigger

_VIEW_OR_CAST = {
    "ToCopyBackward0",
    "TBackward0",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "PermuteBackward0",
    "TransposeBackward0",
    "ExpandBackward0",
    "UnsqueezeBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "ReshapeAliasBackward0",
    "AliasBackward0",
    "CloneBackward0",
}


def param_storage_ptrs(module: nn.Module) -> set[int]:
    """Storage addresses of parameters and buffers: saved views of these are never swapped."""
    ptrs = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


def derived_from_param(t: torch.Tensor, depth: int = 4) -> bool:
    """True if ``t`` is a parameter seen through casts/views (e.g. an autocast fp16 weight copy).

    Such copies live in autocast's cache for the whole forward, so swapping them frees nothing.
    """
    fn = t.grad_fn
    for _ in range(depth):
        if fn is None:
            return False
        if type(fn).__name__ == "AccumulateGrad":
            return isinstance(getattr(fn, "variable", None), nn.Parameter)
        if fn.name() not in _VIEW_OR_CAST:
            return False
        nxt = [f for f, _ in fn.next_functions if f is not None]
        if len(nxt) != 1:
            return False
        fn = nxt[0]
    return False


def swappable(t: torch.Tensor, device: torch.device, param_ptrs: set[int], min_bytes: int) -> bool:
    """Whether a saved tensor may be offloaded: big, dense, on the compute device, not a parameter."""
    if type(t) is not torch.Tensor or t.layout != torch.strided or t.is_nested:
        return False
    if t.device != device or t.numel() * t.element_size() < min_bytes:
        return False
    if not (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))):
        return False
    if t.untyped_storage().data_ptr() in param_ptrs:
        return False
    return not derived_from_param(t)


def first_grad_tensor(obj: Any, depth: int = 3) -> torch.Tensor | None:
    """First tensor requiring grad in a module output (tensor, tuple, dict, diffusers BaseOutput)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.requires_grad else None
    if depth == 0:
        return None
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for o in obj:
            t = first_grad_tensor(o, depth - 1)
            if t is not None:
                return t
    return None


class _Held:
    __slots__ = ("index", "tensor")

    def __init__(self, index: int, tensor: torch.Tensor) -> None:
        self.index = index
        self.tensor = tensor


class StepRecorder:
    """Records one step's timeline; pack/unpack hand back the very tensor, so results are unchanged."""

    def __init__(self, device: torch.device, param_ptrs: set[int], min_bytes: int) -> None:
        self.device = device
        self.param_ptrs = param_ptrs
        self.min_bytes = min_bytes
        self.cuda = device.type == "cuda"
        self.t0 = self._now()
        self.tb: float | None = None
        self.te: float | None = None
        self.records: list[dict[str, Any]] = []
        self.need: dict[int, float] = {}
        self.triggers: list[Trigger] = []
        self.stack: list[str] = []
        self.calls: dict[str, int] = {}
        self.fwd_start: dict[str, float] = {}
        self.fwd_time: dict[str, float] = {}
        self.storage_group: dict[int, int] = {}

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # forward --------------------------------------------------------------------------------------
    def module_pre(self, name: str) -> str:
        k = self.calls.get(name, 0)
        self.calls[name] = k + 1
        key = f"{name}#{k}"
        self.stack.append(key)
        self.fwd_start[key] = self._now()
        return key

    def module_post(self, name: str, output: Any) -> None:
        key = None
        while self.stack:  # pop through modules whose post-hook never ran (exceptions)
            key = self.stack.pop()
            if key.rsplit("#", 1)[0] == name:
                break
        if key is None:
            return
        now = self._now()
        base = key.rsplit("#", 1)[0]
        self.fwd_time[base] = self.fwd_time.get(base, 0.0) + now - self.fwd_start.pop(key, now)
        t = first_grad_tensor(output)
        if t is not None:
            t.register_hook(self._make_grad_hook(key))

    def _make_grad_hook(self, key: str):
        def hook(grad: torch.Tensor) -> None:
            if self.tb is not None:
                self.triggers.append(Trigger(key, self._now() - self.tb))

        return hook

    def pack(self, t: torch.Tensor) -> Any:
        if self.tb is not None:  # saved during backward (double backward): not part of the plan
            return t
        idx = len(self.records)
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        group = self.storage_group.setdefault(ptr, len(self.storage_group))
        is_param = ptr in self.param_ptrs or derived_from_param(t)
        self.records.append(
            dict(
                index=idx,
                nbytes=t.numel() * t.element_size(),
                group=-1 if is_param else group,
                group_bytes=0 if is_param or t.device != self.device else storage.nbytes(),
                pack_time=self._now() - self.t0,
                eligible=swappable(t, self.device, self.param_ptrs, self.min_bytes),
                owner=self.stack[-1] if self.stack else "<root>",
                sig=(tuple(t.shape), t.dtype),
            )
        )
        return _Held(idx, t)

    def unpack(self, held: Any) -> torch.Tensor:
        if not isinstance(held, _Held):
            return held
        if held.index not in self.need and self.tb is not None:
            self.need[held.index] = self._now() - self.tb
        return held.tensor

    # backward -------------------------------------------------------------------------------------
    def backward_begin(self) -> None:
        if self.tb is None:
            self.tb = self._now()

    def backward_end(self) -> None:
        self.te = self._now()

    def result(self) -> tuple[StepProfile, list[tuple]]:
        """The profile (parameter records dropped) and the per-index (shape, dtype) signatures."""
        tb = self.tb if self.tb is not None else self._now()
        te = self.te if self.te is not None else tb
        recs = []
        for r in self.records:
            if r["group"] < 0:
                continue
            sig = r.pop("sig")
            recs.append(SavedRecord(need_time=self.need.get(r["index"], math.inf), **r))
            r["sig"] = sig
        sigs = [r["sig"] for r in self.records]
        trig_times = sorted(t.time for t in self.triggers)
        bwd: dict[str, float] = {}
        for t in self.triggers:
            later = [x for x in trig_times if x > t.time]
            nxt = later[0] if later else te - tb
            base = t.key.rsplit("#", 1)[0]
            bwd[base] = bwd.get(base, 0.0) + nxt - t.time
        names = set(self.fwd_time) | set(bwd)
        times = {n: (self.fwd_time.get(n, 0.0), bwd.get(n, 0.0)) for n in names}
        prof = StepProfile(recs, list(self.triggers), tb - self.t0, te - tb, times)
        return prof, sigs


def measure_bandwidth(device: torch.device, nbytes: int = 32 << 20, reps: int = 3) -> Bandwidth:
    """Host<->device copy bandwidth with pinned buffers (host memcpy bandwidth on CPU)."""
    if device.type == "cuda":
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        res = []
        for src, dst in ((dev, host), (host, dev)):
            dst.copy_(src, non_blocking=True)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            res.append(nbytes * reps / (start.elapsed_time(end) / 1e3))
        return Bandwidth(d2h=res[0], h2d=res[1], latency=10e-6)
    nbytes = min(nbytes, 16 << 20)
    a = torch.empty(nbytes, dtype=torch.uint8)
    b = torch.empty(nbytes, dtype=torch.uint8)
    b.copy_(a)
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    bw = nbytes * reps / max(time.perf_counter() - t, 1e-9)
    return Bandwidth(d2h=bw, h2d=bw, latency=2e-6)
