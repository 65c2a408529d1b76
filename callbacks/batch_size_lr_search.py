"""Lightning callback: efficiency-optimal batch size and matching learning rate (AccUDNN's tuner).

Lightning's ``BatchSizeFinder`` returns the *largest* batch that fits. Past the point where the device
is saturated a larger batch does not raise samples/s, and past the critical batch size it does not
reduce the number of steps to a given loss either, so the largest batch wastes memory (and with
swap-out, transfer time). This callback keeps the smallest batch within ``tolerance`` of the best
measured throughput, optionally capped by the critical batch size, then rescales the learning rate.

The callback only wires the parts to Lightning's hooks:
``throughput_search`` decides what to measure and what to keep (pure), ``trial_runner`` measures
through the strategy and restores all state afterwards, ``noise_scale`` estimates the critical batch,
``lr_scaling`` picks and applies the lr.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr

from callbacks.lr_scaling import rescale_lrs, scale_lr
from callbacks.swap_out import SwapOutCallback
from callbacks.throughput_search import (
    ThroughputSearch,
    Trial,
    cap_at_critical_batch,
    choose_batch,
    merge_trials,
    round_to_world,
)
from callbacks.trial_runner import TrialRunner

__all__ = ["BatchSizeLRSearch", "Trial", "choose_batch", "merge_trials"]


class BatchSizeLRSearch(pl.Callback):
    """Search the global batch size for throughput within a memory budget; scale the lr to match.

    Runs in ``on_fit_start``, where the strategy has set up model and optimizers but no step was taken.
    The lr warm-up, if any, is the module's own scheduler's: its base lrs are rescaled with the lr.

    Args:
        init_batch: first global batch tried (default: the current ``batch_size_attr`` x world size).
        max_batch: upper limit for the global batch.
        max_trials: total trials (doubling + refinement).
        refine_steps: trials spent after doubling between the best/largest fitting batch and its
            neighbours.
        trial_steps: timed optimizer steps per trial (after ``trial_warmup`` untimed ones; the swap
            callback's profiling steps are added to the warmup).
        tolerance: pick the smallest batch with throughput >= (1 - tolerance) x best.
        confirm_top: after the search, time the ``confirm_top`` fastest batches once more and average:
            a single noisy trial (another job on the machine, a clock change) cannot decide alone.
        memory_budget: bytes or fraction of device memory; a trial whose peak exceeds it counts as a
            failure (on CPU the estimate is parameter/optimizer state plus saved activations).
        critical_batch: also cap the batch by the gradient-noise-scale critical batch estimate.
        noise_steps: batches used for that estimate.
        lr_rule: "linear" (SGD, Goyal et al.), "sqrt" (Adam) or "none".
        ref_lr, ref_batch: the lr known to work at global batch ``ref_batch`` (default: the current lr
            and batch).
        candidates: explicit list of global batches to measure instead of the search (brute force).
        batch_size_attr, lr_attr: attribute names looked up on the module, its hparams and datamodule.
    """

    def __init__(
        self,
        init_batch: int | None = None,
        max_batch: int = 4096,
        max_trials: int = 12,
        refine_steps: int = 2,
        trial_steps: int = 3,
        trial_warmup: int = 1,
        tolerance: float = 0.05,
        confirm_top: int = 3,
        memory_budget: float | None = None,
        critical_batch: bool = False,
        noise_steps: int = 4,
        lr_rule: str = "linear",
        ref_lr: float | None = None,
        ref_batch: int | None = None,
        candidates: list[int] | None = None,
        batch_size_attr: str = "batch_size",
        lr_attr: str = "lr",
    ) -> None:
        super().__init__()
        scale_lr(1.0, 1, 1, lr_rule)  # validate early
        self.init_batch = init_batch
        self.max_batch = max_batch
        self.max_trials = max_trials
        self.refine_steps = refine_steps
        self.tolerance = tolerance
        self.confirm_top = max(0, int(confirm_top))
        self.trial_steps = max(1, trial_steps)
        self.trial_warmup = max(0, trial_warmup)
        self.memory_budget = memory_budget
        self.critical_batch = critical_batch
        self.noise_steps = noise_steps
        self.lr_rule = lr_rule
        self.ref_lr = ref_lr
        self.ref_batch = ref_batch
        self.candidates = list(candidates) if candidates else None
        self.batch_size_attr = batch_size_attr
        self.lr_attr = lr_attr
        self.trials: list[Trial] = []
        self.result: dict[str, Any] = {}
        self._done = False

    # ------------------------------------------------------------------------------------ lightning
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done:
            return
        self._done = True
        if not pl_module.automatic_optimization:
            rank_zero_warn("BatchSizeLRSearch: manual optimization is not supported; skipping the search")
            return
        if not lightning_hasattr(pl_module, self.batch_size_attr):
            rank_zero_warn(f"BatchSizeLRSearch: no `{self.batch_size_attr}` on the module/datamodule; skipping")
            return
        self.search(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"result": self.result, "trials": [asdict(t) for t in self.trials]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.result = state_dict.get("result", {})
        self.trials = [Trial(**t) for t in state_dict.get("trials", [])]
        self._done = bool(self.result)

    # --------------------------------------------------------------------------------------- search
    def search(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Run the trials, apply batch size and lr, and return the decision."""
        world = max(1, trainer.world_size)
        cur_local = int(lightning_getattr(pl_module, self.batch_size_attr))
        ref_batch = self.ref_batch or cur_local * world
        ref_lr = self.ref_lr
        if ref_lr is None:
            ref_lr = (
                float(lightning_getattr(pl_module, self.lr_attr))
                if lightning_hasattr(pl_module, self.lr_attr)
                else float(trainer.optimizers[0].param_groups[0]["lr"])
            )
        runner = TrialRunner(
            trainer,
            pl_module,
            batch_size_attr=self.batch_size_attr,
            trial_steps=self.trial_steps,
            trial_warmup=self.trial_warmup,
            memory_budget=self.memory_budget,
            swap=next((c for c in trainer.callbacks if isinstance(c, SwapOutCallback)), None),
        )
        plan = ThroughputSearch(self.max_batch, self.max_trials, self.refine_steps, self.tolerance, self.confirm_top)
        with runner:
            if self.candidates:
                plan.run_candidates(runner.measure, self.candidates, world, self.trials)
            else:
                plan.run(runner.measure, round_to_world(self.init_batch or cur_local * world, world), world, self.trials)
            chosen = plan.choose(self.trials)
            b_crit = math.nan
            if self.critical_batch:
                b_crit = runner.critical_batch(chosen.batch // world, self.noise_steps)
                chosen = cap_at_critical_batch(chosen, self.trials, b_crit)
        decision = {
            "batch_size": chosen.batch,
            "local_batch_size": chosen.batch // world,
            "lr": scale_lr(ref_lr, ref_batch, chosen.batch, self.lr_rule),
            "throughput": chosen.throughput,
            "best_throughput": max(t.throughput for t in merge_trials(self.trials) if t.ok),  # repeats averaged
            "critical_batch": b_crit,
            "ref_lr": ref_lr,
            "ref_batch": ref_batch,
        }
        decision = trainer.strategy.broadcast(decision, src=0)  # every rank applies rank 0's decision
        self._apply(trainer, pl_module, decision)
        self.result = decision
        self._log(trainer)
        return decision

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, d: dict[str, Any]) -> None:
        lightning_setattr(pl_module, self.batch_size_attr, d["local_batch_size"])
        if lightning_hasattr(pl_module, self.lr_attr):
            lightning_setattr(pl_module, self.lr_attr, d["lr"])
        # configure_optimizers already ran: rescale the live optimizers and schedulers as well
        rescale_lrs(trainer.optimizers, [c.scheduler for c in trainer.lr_scheduler_configs], d["lr"])

    def _log(self, trainer: pl.Trainer) -> None:
        lines = ["BatchSizeLRSearch  batch  samples/s  step_ms  peak_MB  status"]
        for t in self.trials:
            lines.append(
                f"                   {t.batch:5d}  {t.throughput:9.1f}  {t.step_time * 1e3:7.1f}  "
                f"{t.peak_bytes / 2**20:7.1f}  {t.status}"
            )
        d = self.result
        lines.append(
            f"chosen batch {d['batch_size']} (local {d['local_batch_size']}), lr {d['lr']:.3g} "
            f"({self.lr_rule} from {d['ref_lr']:.3g} @ {d['ref_batch']}), critical batch {d['critical_batch']:.3g}"
        )
        rank_zero_info("\n".join(lines))
        for logger in trainer.loggers:
            for i, t in enumerate(self.trials):
                logger.log_metrics(
                    {"bs_search/batch": t.batch, "bs_search/throughput": t.throughput, "bs_search/ok": float(t.ok)},
                    step=i,
                )
            logger.log_metrics(
                {"bs_search/chosen_batch": d["batch_size"], "bs_search/lr": d["lr"]}, step=len(self.trials)
            )
