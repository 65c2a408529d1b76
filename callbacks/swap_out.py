"""Lightning callback: performance-model guided activation swap-out (AccUDNN's memory optimizer).

Works with any LightningModule: it only installs hooks (``saved_tensors_hooks`` around each training
step, module forward hooks and output-gradient hooks for prefetch) and removes them in ``teardown``.
The work is done by :class:`callbacks.swap_engine.SwapEngine`.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from callbacks.swap_engine import SwapEngine

_MB = float(1 << 20)


def batch_signature(batch: Any) -> Any:
    """Hashable shapes/dtypes of the tensors in a batch: a change triggers profiling and re-planning."""
    if isinstance(batch, torch.Tensor):
        return (tuple(batch.shape), str(batch.dtype))
    if isinstance(batch, dict):
        return tuple((k, batch_signature(v)) for k, v in sorted(batch.items(), key=lambda kv: str(kv[0])))
    if isinstance(batch, (list, tuple)):
        return tuple(batch_signature(b) for b in batch)
    return type(batch).__name__


class SwapOutCallback(pl.Callback):
    """Offload saved activations to host memory so resident activations stay under ``memory_budget``.

    Args:
        memory_budget: bytes allowed for resident saved activations (> 1), or a fraction (<= 1) of total
            device memory for the whole step (parameters, optimizer state and temporaries, measured
            while profiling, are subtracted).
        min_bytes: tensors smaller than this are never swapped (copy latency dominates).
        profile_steps: steps profiled per new input signature before planning (the first warms up).
        drift_tolerance, drift_patience: re-plan after ``drift_patience`` consecutive steps whose measured
            forward+backward time departs from the prediction by more than ``drift_tolerance``.
        max_replans: drift re-plans allowed per input signature.
        log_every_n_steps: how often to log ``swap/*`` metrics.
    """

    def __init__(
        self,
        memory_budget: float = 0.5,
        min_bytes: int = 1 << 16,
        profile_steps: int = 2,
        drift_tolerance: float = 0.3,
        drift_patience: int = 3,
        max_replans: int = 2,
        log_every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        self.kwargs = dict(
            memory_budget=memory_budget,
            min_bytes=min_bytes,
            profile_steps=profile_steps,
            drift_tolerance=drift_tolerance,
            drift_patience=drift_patience,
            max_replans=max_replans,
        )
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.engine: SwapEngine | None = None
        self.enabled = True
        self._active = False

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.engine.history if self.engine is not None else []

    # ---------------------------------------------------------- for steps run outside Lightning's loop
    # A caller that runs optimizer steps itself (the batch-size search's trials) drives the swap through
    # these instead of calling the hooks or reading engine internals.
    @property
    def profile_steps(self) -> int:
        """Steps of each new batch signature that are profiled (no offload, synchronised) before the plan
        executes: a caller timing steady-state steps at a new batch size skips this many."""
        return int(self.kwargs["profile_steps"])

    @property
    def last_resident_bytes(self) -> int | None:
        """Saved-activation bytes the last finished step kept on the device (None before any)."""
        return self.history[-1].get("measured_resident_bytes") if self.history else None

    def begin_step(self, batch: Any) -> None:
        """Install the hooks for one training step on ``batch`` (no-op when disabled or not set up)."""
        if not self.enabled or self.engine is None:
            return
        self.engine.step_begin(batch_signature(batch))
        self._active = True

    def end_step(self) -> dict[str, Any] | None:
        """Close the step opened by :meth:`begin_step` and return its figures (None if none was open)."""
        if not self._active:
            return None
        self._active = False
        return self.engine.step_end()

    @property
    def state_key(self) -> str:
        return f"SwapOutCallback{{'memory_budget': {self.kwargs['memory_budget']}}}"

    # ------------------------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and (self.engine is None or self.engine.model is not pl_module):
            self.engine = SwapEngine(pl_module, **self.kwargs)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.engine is not None:
            self.engine.close()  # hooks removed, pool freed; kept for inspection of history/plans
        self._active = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.abort_step()

    def abort_step(self) -> None:
        """Leave the hooks of an interrupted step (an exception, e.g. an OOM trial) without recording it."""
        if self.engine is not None:
            self.engine.abort()
        self._active = False

    # ---------------------------------------------------------------------------------------- step
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.enabled and self.engine is None:
            self.engine = SwapEngine(pl_module, **self.kwargs)
        self.begin_step(batch)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._active:
            self.engine.backward_begin()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self.engine.backward_end()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stats = self.end_step()
        if stats is not None and trainer.global_step % self.log_every_n_steps == 0:
            self._log(pl_module, stats)

    def _log(self, pl_module: pl.LightningModule, stats: dict[str, Any]) -> None:
        metrics = {
            "swap/planned_resident_mb": stats.get("planned_resident_bytes"),
            "swap/measured_resident_mb": stats.get("measured_resident_bytes"),
            "swap/baseline_resident_mb": stats.get("baseline_resident_bytes"),
            "swap/swapped_mb": stats.get("swapped_bytes"),
            "swap/measured_peak_mb": stats.get("measured_peak_bytes"),
            "swap/predicted_step_ms": stats.get("predicted_step_time"),
            "swap/measured_step_ms": stats.get("measured_step_time"),
        }
        out = {}
        for k, v in metrics.items():
            if v is None:
                continue
            out[k] = float(v) / _MB if k.endswith("_mb") else float(v) * 1e3
        out["swap/replans"] = float(stats.get("replans", 0))
        pl_module.log_dict(out, on_step=True, on_epoch=False, batch_size=1)
