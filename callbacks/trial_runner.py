"""Timed trial optimizer steps at a given batch size, run through the trainer's strategy before fit.

What is measured is what training will see: the precision plugin (AMP scaler), the DDP wrapper/reducer
and the swap callback all take part. Used as a context manager, the runner restores everything the
trials changed on exit, so the search leaves nothing behind but its decision.

Logging during trials. ``training_step`` may call ``self.log``, which needs the fit loop's result
collection and the module's current hook name. The collection already exists in ``on_fit_start``
(``trainer.training`` is set and the fit loop built it with the trainer); trials call ``training_step``
through the dispatchers Lightning's own loop uses (``trainer.call._call_strategy_hook`` for a step through
the strategy, ``_call_lightning_module_hook`` for the noise-scale halves that must bypass the DDP wrapper),
which set and restore the hook name, so ``self.log`` runs its normal, validated path. On exit the result collection is reset with the same call ``Trainer`` makes right before
``strategy.setup`` (``_logger_connector.reset_results``): trial values never reach the loggers or the
first epoch's aggregates. These are underscored Lightning functions (Lightning exposes no public way to
run a step outside its loop; its own ``BatchSizeFinder`` instead re-runs ``fit_loop`` and swaps
callbacks, loggers, limits and dataloaders through more private state), but nothing is patched.
"""

from __future__ import annotations

import gc
import math
import time
from contextlib import ExitStack
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer import call as lightning_call
from pytorch_lightning.utilities.data import extract_batch_size
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.memory import is_oom_error
from pytorch_lightning.utilities.parsing import lightning_getattr, lightning_setattr

from callbacks.noise_scale import mean_noise_terms
from callbacks.swap_engine import device_memory_bytes
from callbacks.swap_out import SwapOutCallback
from callbacks.throughput_search import Status, Trial
from callbacks.training_state import restored_on_exit


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or is_oom_error(e)


def _samples(batch: Any) -> int | None:
    try:
        return extract_batch_size(batch)
    except MisconfigurationException:  # no tensor in the batch: its length is unknown
        return None


def _loss(out: Any) -> torch.Tensor:
    return out["loss"] if isinstance(out, dict) else out


class TrialRunner:
    """Measures global batch sizes for :class:`callbacks.throughput_search.ThroughputSearch`.

    Args:
        trainer, pl_module: a trainer in ``on_fit_start`` (strategy set up, optimizers built).
        batch_size_attr: batch-size attribute on the module, its hparams or datamodule (per rank).
        trial_steps: timed optimizer steps per trial (the median counts).
        trial_warmup: untimed steps first (the swap callback's profiling steps are added).
        memory_budget: bytes (> 1) or fraction of device memory; a trial whose peak exceeds it fails.
        swap: the swap-out callback, if any: its hooks run in every trial step.
    """

    def __init__(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        *,
        batch_size_attr: str = "batch_size",
        trial_steps: int = 3,
        trial_warmup: int = 1,
        memory_budget: float | None = None,
        swap: SwapOutCallback | None = None,
    ) -> None:
        self.trainer = trainer
        self.module = pl_module
        self.batch_size_attr = batch_size_attr
        self.trial_steps = max(1, trial_steps)
        self.trial_warmup = max(0, trial_warmup)
        self.memory_budget = memory_budget
        self.swap = swap
        self.world = max(1, trainer.world_size)
        self._stack = ExitStack()

    # ------------------------------------------------------------------------------- restore on exit
    def __enter__(self) -> TrialRunner:
        stack = self._stack
        stack.enter_context(restored_on_exit(self.trainer))
        stack.callback(lightning_setattr, self.module, self.batch_size_attr,
                       lightning_getattr(self.module, self.batch_size_attr))
        stack.callback(self.trainer._logger_connector.reset_results)  # drop what trials logged (see module doc)
        if self.swap is not None:
            stack.callback(self.swap.abort_step)
        return self

    def __exit__(self, *exc: Any) -> bool:
        return bool(self._stack.__exit__(*exc))

    # ---------------------------------------------------------------------------------------- trials
    def measure(self, batch: int) -> Trial:
        """Time ``trial_steps`` optimizer steps at global ``batch``. Every rank agrees on the result: any
        rank's failure fails the trial, the slowest rank sets the step time and the largest peak counts."""
        local = batch // self.world
        lightning_setattr(self.module, self.batch_size_attr, local)
        warm = self.trial_warmup + (self.swap.profile_steps if self.swap is not None else 0)
        n = warm + self.trial_steps
        cuda = self.module.device.type == "cuda"
        status: Status = "ok"
        times: list[float] = []
        peak = 0
        batches = self._batches(n, local)
        if batches is None:
            status = "data"
        else:
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.module.device)
            try:
                for k in range(n):
                    dev_batch = self.trainer.strategy.batch_to_device(batches[k % len(batches)])
                    if cuda:
                        torch.cuda.synchronize(self.module.device)
                    t0 = time.perf_counter()
                    estimate = self._step(dev_batch, k)
                    if cuda:
                        torch.cuda.synchronize(self.module.device)
                    if k >= warm:
                        times.append(time.perf_counter() - t0)
                    peak = max(peak, estimate)
            except Exception as e:  # only OOM is a trial outcome; anything else is a bug and re-raised
                if not is_oom(e):
                    raise
                status = "oom"
                self._recover_from_oom(cuda)
            if status == "ok" and cuda:
                peak = torch.cuda.max_memory_allocated(self.module.device)
        failed = self._reduce(float(status != "ok"), "sum")
        step = sorted(times)[len(times) // 2] if times and status == "ok" else math.inf  # median: robust
        if self.world > 1:
            step = self._reduce(step, "max")
            peak = int(self._reduce(peak, "max"))  # a per-rank budget verdict would let the ranks' searches diverge
        if failed > 0 and status == "ok":
            status = "oom"
        budget = self._budget_bytes()
        if status == "ok" and budget is not None and peak > budget:
            status = "over_budget"
        throughput = batch / step if status == "ok" and step > 0 else 0.0
        return Trial(batch, throughput, step, int(peak), status)

    def critical_batch(self, local: int, noise_steps: int) -> float:
        """Critical batch ``S/|G|^2`` from the gradient noise scale at local batch ``local`` (halves as the
        small batch); terms averaged over ranks before dividing. NaN when it cannot be estimated."""
        if local < 2:
            return math.nan
        lightning_setattr(self.module, self.batch_size_attr, local)
        strategy = self.trainer.strategy
        params = [p for p in self.module.parameters() if p.requires_grad]

        def loss_of(half: Any, k: int) -> torch.Tensor:
            with strategy.precision_plugin.train_step_context():
                return _loss(lightning_call._call_lightning_module_hook(self.trainer, "training_step", half, k))

        batches = (strategy.batch_to_device(b) for b in self._batches(noise_steps, local) or [])
        terms = mean_noise_terms(loss_of, params, batches, local)
        if terms is None:
            return math.nan
        g2, s = (self._reduce(v, "mean") for v in terms)
        return math.inf if g2 <= 0 else max(s / g2, 0.0)

    # --------------------------------------------------------------------------------------- helpers
    def _step(self, batch: Any, idx: int) -> int:
        """One optimizer step through the strategy; returns the CPU estimate of activation + state bytes
        (0 on CUDA, where the allocator's peak is read instead)."""
        strategy = self.trainer.strategy
        opt = self.trainer.optimizers[0]
        cpu = self.module.device.type != "cuda"
        saved = [0]

        def count(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        def closure() -> torch.Tensor:
            if cpu and self.swap is None:
                with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
                    out = lightning_call._call_strategy_hook(self.trainer, "training_step", batch, idx)
            else:
                out = lightning_call._call_strategy_hook(self.trainer, "training_step", batch, idx)
            loss = _loss(out)
            strategy.backward(loss, opt)
            return loss

        if self.swap is not None:
            self.swap.begin_step(batch)
        strategy.optimizer_step(opt, closure)
        if self.swap is not None:
            self.swap.end_step()
            saved[0] = self.swap.last_resident_bytes or 0
        opt.zero_grad(set_to_none=True)
        if not cpu:
            return 0
        state = 2 * sum(p.numel() * p.element_size() for p in self.module.parameters())  # weights + grads
        state += sum(
            v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )
        return saved[0] + state

    def _recover_from_oom(self, cuda: bool) -> None:
        if self.swap is not None:
            self.swap.abort_step()
        for opt in self.trainer.optimizers:
            opt.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    def _loader(self) -> Any:
        if self.trainer.datamodule is not None:
            return self.trainer.datamodule.train_dataloader()
        return self.module.train_dataloader()

    def _batches(self, n: int, local: int) -> list[Any] | None:
        """``n`` full batches of ``local`` samples (a short last batch would be a different trial)."""
        out: list[Any] = []
        for _ in range(2):  # one restart when the dataset is shorter than n batches
            for batch in self._loader():
                size = _samples(batch)
                if size is not None and size < local:
                    break
                out.append(batch)
                if len(out) == n:
                    return out
            if not out:
                return None
        return out or None

    def _budget_bytes(self) -> float | None:
        if self.memory_budget is None:
            return None
        if self.memory_budget > 1:
            return float(self.memory_budget)
        return device_memory_bytes(self.module.device) * float(self.memory_budget)

    def _reduce(self, value: float, op: str) -> float:
        """All-reduce a number across ranks. The tensor lives on the strategy's root device: NCCL only
        reduces CUDA tensors, gloo CPU ones, and the strategy knows which one this process uses."""
        t = torch.tensor(float(value), dtype=torch.float64, device=self.trainer.strategy.root_device)
        return float(self.trainer.strategy.reduce(t, reduce_op=op))
