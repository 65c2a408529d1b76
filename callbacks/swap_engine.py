"""Execution engine for planned activation swap-out; independent of Lightning (the bench drives it).

Per training step: ``step_begin`` (enters ``saved_tensors_hooks``), ``backward_begin``, ``backward_end``,
``step_end``. The first ``profile_steps`` steps of every new input signature are profiled; then a plan
is made (see :mod:`callbacks.swap_plan`) and executed:

* pack: a planned tensor is copied into a reusable host buffer on a side CUDA stream (the compute
  stream never waits; ``record_stream`` keeps the device block alive until the copy is done);
* prefetch: the gradient hook of a later module's output (or backward start) copies it back on a
  second side stream;
* unpack: the compute stream waits on that copy's event only when autograd actually needs the tensor.

Without CUDA the same path runs with synchronous copies into separate host buffers, so the logic is
exercised on CPU. Copies are exact, hence gradients are bit-for-bit unchanged.
"""

from __future__ import annotations

import os
import time
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from callbacks.host_pool import HostBufferPool
from callbacks.profiler import (
    StepRecorder,
    derived_from_param,
    first_grad_tensor,
    measure_bandwidth,
    param_storage_ptrs,
)
from callbacks.swap_plan import BACKWARD_START, Bandwidth, StepProfile, SwapPlan, plan_swap


class _Swapped:
    """What autograd stores instead of an offloaded tensor."""

    __slots__ = ("index", "host", "done", "ready", "dev", "shape", "stride", "dtype", "box", "__weakref__")

    def __init__(self, index: int, host: torch.Tensor, done: Any, shape, stride, dtype) -> None:
        self.index = index
        self.host = host
        self.done = done  # d2h copy event (CUDA) or None
        self.ready = None  # h2d copy event (CUDA) or None
        self.dev: torch.Tensor | None = None
        self.shape, self.stride, self.dtype = shape, stride, dtype
        self.box = [done]  # last event touching the host buffer, read by the pool on release


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class SwapEngine:
    def __init__(
        self,
        model: nn.Module,
        memory_budget: float,
        min_bytes: int = 1 << 16,
        profile_steps: int = 2,
        drift_tolerance: float = 0.3,
        drift_patience: int = 3,
        max_replans: int = 2,
        max_plans: int = 4,
        bandwidth: Bandwidth | None = None,
    ) -> None:
        if memory_budget <= 0:
            raise ValueError("memory_budget must be > 0 (bytes, or a fraction of device memory <= 1)")
        self.model = model
        self.memory_budget = memory_budget
        self.min_bytes = min_bytes
        self.profile_steps = max(1, profile_steps)
        self.drift_tolerance = drift_tolerance
        self.drift_patience = drift_patience
        self.max_replans = max_replans
        self.max_plans = max_plans
        self.bandwidth = bandwidth
        self.pool = HostBufferPool()
        self.plans: OrderedDict[Any, tuple[SwapPlan, list[tuple]]] = OrderedDict()
        self.profiles: dict[Any, StepProfile] = {}
        self.history: list[dict[str, Any]] = []
        self.replans = 0
        self._profiled: dict[Any, int] = {}
        self._replans_per_sig: dict[Any, int] = {}
        self._drift = 0
        self._hooks: list[Any] = []
        self._hooked_for: Any = None
        self._ctx: Any = None
        self._mode = "idle"
        self._sig: Any = None
        self._d2h = self._h2d = None
        self._reset_step()

    # ------------------------------------------------------------------------------------------ utils
    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def _reset_step(self) -> None:
        self._count = 0
        self._in_backward = False
        self._handles: weakref.WeakValueDictionary[int, _Swapped] = weakref.WeakValueDictionary()
        self._kept: dict[int, int] = {}
        self._swapped_bytes = 0
        self._mismatch = 0
        self._late = 0
        self._calls: dict[str, int] = {}
        self._recorder: StepRecorder | None = None
        self._plan: SwapPlan | None = None
        self._sigs: list[tuple] = []
        self._resident_at_fwd_end: int | None = None
        self._t_backward_end: float | None = None

    def _now(self) -> float:
        return time.perf_counter()

    def activation_budget(self, static_bytes: int, transient_bytes: int = 0) -> float:
        """Bytes allowed for resident saved activations.

        An absolute budget (> 1) is used as is; a fraction is of total device memory minus what the
        step needs besides saved activations (parameters, grads, optimizer state, temporaries).
        """
        if self.memory_budget > 1:
            return float(self.memory_budget)
        total = device_memory_bytes(self.device) * float(self.memory_budget)
        return max(0.0, total - static_bytes - transient_bytes)

    # -------------------------------------------------------------------------------------- lifecycle
    def step_begin(self, signature: Any) -> None:
        """Start a step (forward+backward) with input ``signature`` (shapes); enters the pack hooks."""
        if self._ctx is not None:  # previous step died (e.g. OOM) without step_end
            self.abort()
        self._reset_step()
        self._sig = signature
        self._param_ptrs = param_storage_ptrs(self.model)
        dev = self.device
        if self.bandwidth is None:
            self.bandwidth = measure_bandwidth(dev)
        if self.cuda and self._d2h is None:
            self._d2h, self._h2d = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
        if signature in self.plans:
            self.plans.move_to_end(signature)
            self._mode = "execute"
            self._plan, self._sigs = self.plans[signature]
            pack, unpack = self._pack_exec, self._unpack_exec
        else:
            self._mode = "profile"
            self._recorder = StepRecorder(dev, self._param_ptrs, self.min_bytes)
            pack, unpack = self._recorder.pack, self._recorder.unpack
        self._install_module_hooks()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(dev)
            self._static = torch.cuda.memory_allocated(dev)
            self._ev_start = torch.cuda.Event(enable_timing=True)
            self._ev_start.record()
        else:
            self._static = 2 * sum(p.numel() * p.element_size() for p in self.model.parameters())
        self._t0 = self._now()
        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        self._ctx.__enter__()

    def backward_begin(self) -> None:
        if self._in_backward:
            return
        self._in_backward = True
        self._resident_at_fwd_end = sum(self._kept.values())
        if self._recorder is not None:
            self._recorder.backward_begin()
            if self.cuda:
                self._fwd_peak = torch.cuda.max_memory_allocated(self.device) - self._static
        elif self._plan is not None:
            self._fire(BACKWARD_START)

    def backward_end(self) -> None:
        if self._recorder is not None:
            self._recorder.backward_end()
        if self.cuda:
            self._ev_end = torch.cuda.Event(enable_timing=True)
            self._ev_end.record()
        else:
            self._t_backward_end = self._now()

    def step_end(self) -> dict[str, Any]:
        """Leave the hooks, update profiles/plans, and return this step's figures."""
        self._exit_ctx()
        if self._t_backward_end is None and not self.cuda:
            self._t_backward_end = self._now()
        if self.cuda:
            ev = getattr(self, "_ev_end", None)
            if ev is None:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
            ev.synchronize()
            measured = self._ev_start.elapsed_time(ev) / 1e3
            peak = torch.cuda.max_memory_allocated(self.device) - self._static
        else:
            measured = self._t_backward_end - self._t0
            peak = None
        stats: dict[str, Any] = {"mode": self._mode, "measured_step_time": measured}
        if self._mode == "profile":
            stats.update(self._finish_profile(peak))
        elif self._plan is not None:
            plan = self._plan
            stats.update(
                planned_resident_bytes=plan.predicted_peak,
                baseline_resident_bytes=plan.baseline_peak,
                measured_resident_bytes=self._resident_at_fwd_end
                if self._resident_at_fwd_end is not None
                else sum(self._kept.values()),
                swapped_bytes=self._swapped_bytes,
                predicted_step_time=plan.predicted_step_time,
                late_prefetches=self._late,
                budget=plan.budget,
            )
            if peak is not None:
                stats["measured_peak_bytes"] = peak
            self._check_drift(measured, plan)
        stats["pool_buffers"] = self.pool.num_buffers
        stats["pool_bytes"] = self.pool.total_bytes
        stats["replans"] = self.replans
        self.history.append(stats)
        self._mode = "idle"
        self._recorder = None
        return stats

    def abort(self) -> None:
        """Drop the current step (exception mid-step): leave hooks, forget handles."""
        self._exit_ctx()
        self._mode = "idle"
        self._reset_step()

    def close(self) -> None:
        self.abort()
        self._remove_module_hooks()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.pool.clear()

    def reset(self) -> None:
        """Forget all profiles and plans (e.g. after a batch-size search ran trial steps)."""
        self.plans.clear()
        self.profiles.clear()
        self._profiled.clear()
        self._replans_per_sig.clear()
        self._drift = 0

    def _exit_ctx(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)

    # ------------------------------------------------------------------------------------- planning
    def _finish_profile(self, peak: int | None) -> dict[str, Any]:
        assert self._recorder is not None
        prof, sigs = self._recorder.result()
        sig = self._sig
        self._profiled[sig] = self._profiled.get(sig, 0) + 1
        self.profiles[sig] = prof
        out: dict[str, Any] = {
            "baseline_resident_bytes": prof.activation_bytes,
            "measured_resident_bytes": prof.activation_bytes,
            "swapped_bytes": 0,
            "predicted_step_time": prof.forward_time + prof.backward_time,
        }
        if self._profiled[sig] >= self.profile_steps:
            transient = 0
            if peak is not None:
                transient = max(0, getattr(self, "_fwd_peak", peak) - prof.activation_bytes)
            budget = self.activation_budget(self._static, transient)
            plan = plan_swap(prof, budget, self.bandwidth)
            self.plans[sig] = (plan, sigs)
            while len(self.plans) > self.max_plans:
                self.plans.popitem(last=False)
            out["planned"] = True
            out["budget"] = budget
        return out

    def _check_drift(self, measured: float, plan: SwapPlan) -> None:
        replan = self._mismatch > 0
        if plan.swap and plan.predicted_step_time > 0:
            ratio = measured / plan.predicted_step_time
            self._drift = self._drift + 1 if abs(ratio - 1) > self.drift_tolerance else 0
            replan = replan or self._drift >= self.drift_patience
        if replan and self._replans_per_sig.get(self._sig, 0) < self.max_replans:
            self.request_replan(remeasure_bandwidth=True)

    def request_replan(self, remeasure_bandwidth: bool = False) -> None:
        """Re-profile the current signature on its next step."""
        sig = self._sig
        self._replans_per_sig[sig] = self._replans_per_sig.get(sig, 0) + 1
        self.replans += 1
        self._drift = 0
        self.plans.pop(sig, None)
        self._profiled[sig] = max(0, self.profile_steps - 1)
        if remeasure_bandwidth:
            self.bandwidth = measure_bandwidth(self.device)

    # --------------------------------------------------------------------------------- module hooks
    def _install_module_hooks(self) -> None:
        want = ("profile",) if self._mode == "profile" else ("execute", tuple(sorted(self._plan.prefetch)))
        if want == self._hooked_for:
            return
        self._remove_module_hooks()
        self._hooked_for = want
        if self._mode == "profile":
            for name, mod in self.model.named_modules():
                name = name or "<model>"
                self._hooks.append(mod.register_forward_pre_hook(self._make_pre(name)))
                self._hooks.append(mod.register_forward_hook(self._make_post(name), always_call=True))
            return
        trigger_modules = {k.rsplit("#", 1)[0] for k in self._plan.prefetch if k != BACKWARD_START}
        for name, mod in self.model.named_modules():
            name = name or "<model>"
            if name in trigger_modules:
                self._hooks.append(mod.register_forward_hook(self._make_exec_post(name)))

    def _remove_module_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._hooked_for = None

    def _make_pre(self, name: str):
        def pre(mod, args):
            if self._recorder is not None and not self._in_backward:
                self._recorder.module_pre(name)

        return pre

    def _make_post(self, name: str):
        def post(mod, args, output):
            if self._recorder is not None and not self._in_backward:
                self._recorder.module_post(name, output)

        return post

    def _make_exec_post(self, name: str):
        def post(mod, args, output):
            if self._plan is None or self._in_backward or self._ctx is None:
                return  # not inside one of this engine's steps
            k = self._calls.get(name, 0)
            self._calls[name] = k + 1
            key = f"{name}#{k}"
            if key in self._plan.prefetch:
                t = first_grad_tensor(output)
                if t is not None:
                    t.register_hook(lambda grad, key=key: self._fire(key))

        return post

    # ------------------------------------------------------------------------------- pack / unpack
    def _pack_exec(self, t: torch.Tensor) -> Any:
        if self._in_backward:
            return t
        i = self._count
        self._count += 1
        plan = self._plan
        if i in plan.swap:
            if (
                i < len(self._sigs)
                and self._sigs[i] == (tuple(t.shape), t.dtype)
                and type(t) is torch.Tensor
                and t.device == self.device
                and t.untyped_storage().data_ptr() not in self._param_ptrs
            ):
                return self._offload(t, i)
            self._mismatch += 1
        if t.device == self.device:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self._kept and ptr not in self._param_ptrs and not derived_from_param(t):
                self._kept[ptr] = t.untyped_storage().nbytes()
        return t

    def _offload(self, t: torch.Tensor, i: int) -> _Swapped:
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
        h = _Swapped(i, host, done, t.shape, t.stride(), t.dtype)
        weakref.finalize(h, self._release, buf, h.box)
        self._handles[i] = h
        self._swapped_bytes += n
        return h

    def _release(self, buf: torch.Tensor, box: list) -> None:
        self.pool.release(buf, box[0])

    def _prefetch(self, h: _Swapped) -> None:
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

    def _fire(self, key: str) -> None:
        plan = self._plan
        if plan is None:
            return
        for i in plan.prefetch.get(key, ()):
            h = self._handles.get(i)
            if h is not None:
                self._prefetch(h)

    def _unpack_exec(self, obj: Any) -> torch.Tensor:
        if not isinstance(obj, _Swapped):
            return obj
        if obj.dev is None:
            self._late += 1
            self._prefetch(obj)
        if self.cuda:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(obj.ready)
            obj.dev.record_stream(cur)
        return obj.dev
