"""Execution engine for planned activation swap-out; independent of Lightning (the bench drives it).

Per training step: ``step_begin`` (enters ``saved_tensors_hooks``), ``backward_begin``, ``backward_end``,
``step_end``. The first ``profile_steps`` steps of every new input signature are profiled
(:mod:`callbacks.profiler`); then a plan is made (:mod:`callbacks.swap_plan`) and executed: the pack hook hands
a planned tensor to the copier (:mod:`callbacks.swap_copier`), the gradient hook of a later module's output (or
backward start) starts its prefetch, and the unpack hook waits for it only when autograd needs the tensor. The
engine also watches the plan: a step whose saved tensors differ from the profile's, or whose time drifts from
the prediction, is re-profiled.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from callbacks.profiler import (
    StepRecorder,
    derived_from_param,
    first_grad_tensor,
    measure_bandwidth,
    param_storage_ptrs,
)
from callbacks.swap_copier import SwapCopier
from callbacks.swap_model import BACKWARD_START, Bandwidth, StepProfile
from callbacks.swap_plan import SwapPlan, plan_swap


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
        self.copier = SwapCopier()
        self.plans: OrderedDict[Any, tuple[SwapPlan, list[tuple]]] = OrderedDict()
        self._resident: dict[Any, int] = {}  # signature -> resident saved bytes measured on its plan's first step
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
        self._kept: dict[int, int] = {}
        self._measure_resident = False  # count resident saved bytes (the first step of a plan only)
        self._hook_time = 0.0  # seconds in the pack / unpack hooks (host side)
        self._mismatch = 0
        self._calls: dict[str, int] = {}
        self._recorder: StepRecorder | None = None
        self._plan: SwapPlan | None = None
        self._sigs: list[tuple] = []
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
        dev = self._dev = self.device  # read once: the pack hook runs for every saved tensor
        if self.bandwidth is None:
            self.bandwidth = measure_bandwidth(dev)
        self.copier.begin_step(dev)
        if signature in self.plans:
            self.plans.move_to_end(signature)
            self._mode = "execute"
            self._plan, self._sigs = self.plans[signature]
            self._measure_resident = signature not in self._resident
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
        if self._measure_resident:
            self._resident[self._sig] = sum(self._kept.values())
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
                measured_resident_bytes=self._resident.setdefault(self._sig, sum(self._kept.values())),
                swapped_bytes=self.copier.swapped_bytes,
                predicted_step_time=plan.predicted_step_time,
                late_prefetches=self.copier.late,
                hook_seconds=self._hook_time,
                budget=plan.budget,
            )
            if peak is not None:
                stats["measured_peak_bytes"] = peak
            self._check_drift(measured, plan)
        stats["pool_buffers"] = self.copier.pool.num_buffers
        stats["pool_bytes"] = self.copier.pool.total_bytes
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
        self.copier.close()

    def reset(self) -> None:
        """Forget all profiles and plans (e.g. after a batch-size search ran trial steps)."""
        self.plans.clear()
        self._resident.clear()
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
                self._resident.pop(self.plans.popitem(last=False)[0], None)
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
        self._resident.pop(sig, None)
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
        """Runs for every tensor autograd saves, so a kept tensor costs a set lookup (bookkeeping of the resident
        bytes only on a plan's first step): Python time here is on the critical path of a fast GPU step, and
        ``hook_seconds`` in the step's figures says how much of it there was."""
        t0 = time.perf_counter()
        try:
            return self._pack_planned(t)
        finally:
            self._hook_time += time.perf_counter() - t0

    def _pack_planned(self, t: torch.Tensor) -> Any:
        if self._in_backward:
            return t
        i = self._count
        self._count += 1
        if i in self._plan.swap:
            if (
                i < len(self._sigs)
                and self._sigs[i] == (tuple(t.shape), t.dtype)
                and type(t) is torch.Tensor
                and t.device == self._dev
                and t.untyped_storage().data_ptr() not in self._param_ptrs
            ):
                return self.copier.offload(t, i)
            self._mismatch += 1
        if self._measure_resident and t.device == self._dev:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._kept and ptr not in self._param_ptrs and not derived_from_param(t):
                self._kept[ptr] = storage.nbytes()
        return t

    def _fire(self, key: str) -> None:
        plan = self._plan
        if plan is None:
            return
        self.copier.prefetch(plan.prefetch.get(key, ()))

    def _unpack_exec(self, obj: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.copier.unpack(obj)
        finally:
            self._hook_time += time.perf_counter() - t0
