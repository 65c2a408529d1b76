"""Lightning callback: efficiency-optimal batch size and matching learning rate (AccUDNN's tuner).

Lightning's ``BatchSizeFinder`` returns the *largest* batch that fits. Past the point where the device
is saturated a larger batch does not raise samples/s, and past the critical batch size it does not
reduce the number of steps to a given loss either, so the largest batch wastes memory (and with
swap-out, transfer time). This callback measures throughput per batch size and keeps the smallest
batch within ``tolerance`` of the best, optionally capped by the critical batch size from the gradient
noise scale, then rescales the learning rate to it.

Trials run a few real optimizer steps through the strategy (AMP scaler, DDP reducer, the swap
callback's hooks all active) before training starts; model, optimizer, scheduler, scaler and RNG
states are restored afterwards.
"""

from __future__ import annotations

import copy
import gc
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.memory import is_oom_error
from pytorch_lightning.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr

from callbacks.lr_scaling import scale_lr, warmup_factor
from callbacks.noise_scale import NoiseScaleEstimator, flat_grad_sq_norm, split_batch
from callbacks.swap_engine import device_memory_bytes
from callbacks.swap_out import SwapOutCallback


@dataclass
class Trial:
    batch: int  # global batch size
    throughput: float  # samples/s (global)
    step_time: float  # s per optimizer step
    peak_bytes: int  # peak device memory (CUDA) or estimated activation+state bytes (CPU)
    status: str  # "ok" | "oom" | "over_budget" | "data"


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or is_oom_error(e)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _batch_len(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for b in batch:
            n = _batch_len(b)
            if n is not None:
                return n
    return None


def merge_trials(trials: list[Trial]) -> list[Trial]:
    """One trial per batch: repeated measurements averaged (a batch fails if any of its trials did)."""
    by_batch: dict[int, list[Trial]] = {}
    for t in trials:
        by_batch.setdefault(t.batch, []).append(t)
    merged = []
    for b, ts in by_batch.items():
        bad = [t for t in ts if t.status != "ok"]
        if bad:
            merged.append(bad[0])
            continue
        merged.append(Trial(b, sum(t.throughput for t in ts) / len(ts), sum(t.step_time for t in ts) / len(ts),
                            max(t.peak_bytes for t in ts), "ok"))
    return merged


def choose_batch(trials: list[Trial], tolerance: float) -> Trial:
    """Smallest batch whose measured throughput (repeats averaged) is within ``tolerance`` of the best."""
    ok = [t for t in merge_trials(trials) if t.status == "ok"]
    if not ok:
        raise RuntimeError("no batch size trial succeeded")
    best = max(t.throughput for t in ok)
    return min((t for t in ok if t.throughput >= (1 - tolerance) * best), key=lambda t: t.batch)


class BatchSizeLRSearch(pl.Callback):
    """Search the global batch size for throughput within a memory budget; scale the lr to match.

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
        warmup_steps: linear lr warmup applied by this callback after the search (0: none).
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
        warmup_steps: int = 0,
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
        self.trial_steps = max(1, trial_steps)
        self.trial_warmup = max(0, trial_warmup)
        self.tolerance = tolerance
        self.confirm_top = max(0, int(confirm_top))
        self.memory_budget = memory_budget
        self.critical_batch = critical_batch
        self.noise_steps = noise_steps
        self.lr_rule = lr_rule
        self.ref_lr = ref_lr
        self.ref_batch = ref_batch
        self.warmup_steps = warmup_steps
        self.candidates = list(candidates) if candidates else None
        self.batch_size_attr = batch_size_attr
        self.lr_attr = lr_attr
        self.trials: list[Trial] = []
        self.result: dict[str, Any] = {}
        self._searching = False
        self._done = False
        self._saved_lrs: list[tuple[dict, float]] = []

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

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._searching or self.warmup_steps <= 0:
            return
        f = warmup_factor(trainer.global_step, self.warmup_steps)
        if f < 1.0:
            for g in optimizer.param_groups:
                self._saved_lrs.append((g, g["lr"]))
                g["lr"] = g["lr"] * f

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # restore before the lr schedulers step so their state never sees the warmup factor
        for g, lr in self._saved_lrs:
            g["lr"] = lr
        self._saved_lrs.clear()

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
        saved = self._save_state(trainer, pl_module)
        swap = next((c for c in trainer.callbacks if isinstance(c, SwapOutCallback)), None)
        self._searching = True
        pl_module.log = pl_module.log_dict = lambda *a, **k: None  # no loop results exist yet
        try:
            if self.candidates:
                for b in self.candidates:
                    self._run_trial(trainer, pl_module, swap, self._round(b, world))
            else:
                self._search(trainer, pl_module, swap, self._round(self.init_batch or cur_local * world, world), world)
                self._confirm(trainer, pl_module, swap)
            chosen = choose_batch(self.trials, self.tolerance)
            ok = [t for t in merge_trials(self.trials) if t.status == "ok"]  # repeats averaged
            b_crit = math.nan
            if self.critical_batch:
                b_crit = self._critical_batch(trainer, pl_module, chosen.batch // world, world)
                if math.isfinite(b_crit):
                    fitting = [t for t in ok if t.batch <= max(b_crit, 1)]
                    if fitting:
                        capped = max(fitting, key=lambda t: t.batch)
                        chosen = capped if capped.batch < chosen.batch else chosen
                    else:
                        chosen = min(ok, key=lambda t: t.batch)
        finally:
            del pl_module.log, pl_module.log_dict
            self._searching = False
            self._restore_state(trainer, pl_module, saved)
            if swap is not None:
                swap.abort_step()
        best = max(t.throughput for t in ok)
        new_lr = scale_lr(ref_lr, ref_batch, chosen.batch, self.lr_rule)
        decision = {
            "batch_size": chosen.batch,
            "local_batch_size": chosen.batch // world,
            "lr": new_lr,
            "throughput": chosen.throughput,
            "best_throughput": best,
            "critical_batch": b_crit,
            "warmup_steps": self.warmup_steps,
            "ref_lr": ref_lr,
            "ref_batch": ref_batch,
        }
        decision = trainer.strategy.broadcast(decision, src=0)  # every rank applies rank 0's decision
        self._apply(trainer, pl_module, decision, world)
        self.result = decision
        self._log(trainer)
        return decision

    @staticmethod
    def _round(b: int, world: int) -> int:
        return max(world, int(round(b / world)) * world)

    def _search(self, trainer, pl_module, swap, start: int, world: int) -> None:
        b = start
        fail: int | None = None
        while b <= self.max_batch and len(self.trials) < self.max_trials:
            t = self._run_trial(trainer, pl_module, swap, b)
            if t.status != "ok":
                fail = b
                break
            b *= 2
        while not any(t.status == "ok" for t in self.trials) and fail is not None and fail > world:
            fail = self._round(fail // 2, world)  # even the first batch failed: halve until one fits
            if self._run_trial(trainer, pl_module, swap, fail).status == "ok":
                fail = fail * 2
                break
        for _ in range(self.refine_steps):
            if len(self.trials) >= self.max_trials:
                break
            ok = sorted((t for t in self.trials if t.status == "ok"), key=lambda t: t.batch)
            if not ok:
                break
            chosen = choose_batch(self.trials, self.tolerance)
            largest = ok[-1]
            tried = {t.batch for t in self.trials}
            nxt = None
            if chosen.batch == largest.batch and fail is not None:
                nxt = self._round((largest.batch + fail) // 2, world)  # still rising: probe upwards
            else:
                smaller = [t.batch for t in ok if t.batch < chosen.batch]
                if smaller:
                    nxt = self._round((smaller[-1] + chosen.batch) // 2, world)  # smaller, as fast?
            if nxt is None or nxt in tried:
                break
            t = self._run_trial(trainer, pl_module, swap, nxt)
            if t.status != "ok" and (fail is None or nxt < fail):
                fail = nxt

    def _confirm(self, trainer, pl_module, swap) -> None:
        """Re-time the fastest batches (fastest first) so the decision rests on two measurements each."""
        ok = sorted((t for t in merge_trials(self.trials) if t.status == "ok"), key=lambda t: -t.throughput)
        for t in ok[: self.confirm_top]:
            self._run_trial(trainer, pl_module, swap, t.batch)

    def _loader(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if trainer.datamodule is not None:
            return trainer.datamodule.train_dataloader()
        return pl_module.train_dataloader()

    def _batches(self, trainer, pl_module, n: int, local: int) -> list[Any] | None:
        out: list[Any] = []
        for _ in range(2):  # one restart when the dataset is shorter than n batches
            for batch in self._loader(trainer, pl_module):
                if _batch_len(batch) is not None and _batch_len(batch) < local:
                    break
                out.append(batch)
                if len(out) == n:
                    return out
            if not out:
                return None
        return out or None

    def _run_trial(self, trainer, pl_module, swap, batch: int) -> Trial:
        world = max(1, trainer.world_size)
        local = batch // world
        lightning_setattr(pl_module, self.batch_size_attr, local)
        warm = self.trial_warmup + (swap.kwargs["profile_steps"] if swap is not None else 0)
        n = warm + self.trial_steps
        status, times, peak = "ok", [], 0
        cuda = pl_module.device.type == "cuda"
        batches = self._batches(trainer, pl_module, n, local)
        if batches is None:
            status = "data"
        else:
            if cuda:
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            try:
                for k in range(n):
                    dev_batch = trainer.strategy.batch_to_device(batches[k % len(batches)])
                    if cuda:
                        torch.cuda.synchronize(pl_module.device)
                    t0 = time.perf_counter()
                    act = self._train_step(trainer, pl_module, swap, dev_batch, k)
                    if cuda:
                        torch.cuda.synchronize(pl_module.device)
                    if k >= warm:
                        times.append(time.perf_counter() - t0)
                    peak = max(peak, act)
            except Exception as e:  # noqa: BLE001 - only OOM is handled, everything else re-raised
                if not _is_oom(e):
                    raise
                status = "oom"
            if status == "oom":
                if swap is not None:
                    swap.abort_step()
                for opt in trainer.optimizers:
                    opt.zero_grad(set_to_none=True)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            elif cuda:
                peak = torch.cuda.max_memory_allocated(pl_module.device)
        # every rank must agree: any failure fails the trial, the slowest rank sets the pace
        failed = _reduce(trainer, float(status != "ok"), "sum")
        step = sorted(times)[len(times) // 2] if times and status == "ok" else math.inf  # median: robust
        step = _reduce(trainer, step, "max") if world > 1 else step
        if float(failed) > 0 and status == "ok":
            status = "oom"
        budget = self._budget_bytes(pl_module)
        if status == "ok" and budget is not None and peak > budget:
            status = "over_budget"
        thr = batch / step if status == "ok" and step > 0 else 0.0
        t = Trial(batch, thr, step, int(peak), status)
        self.trials.append(t)
        return t

    def _budget_bytes(self, pl_module: pl.LightningModule) -> float | None:
        if self.memory_budget is None:
            return None
        if self.memory_budget > 1:
            return float(self.memory_budget)
        return device_memory_bytes(pl_module.device) * float(self.memory_budget)

    def _train_step(self, trainer, pl_module, swap, batch: Any, k: int) -> int:
        """One optimizer step through the strategy; returns CPU activation+state byte estimate."""
        opt = trainer.optimizers[0]
        act = [0]
        cpu = pl_module.device.type != "cuda"

        def closure() -> torch.Tensor:
            if cpu and swap is None:
                def count(t: torch.Tensor) -> torch.Tensor:
                    act[0] += t.numel() * t.element_size()
                    return t

                with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
                    out = trainer.strategy.training_step(batch, k)
            else:
                out = trainer.strategy.training_step(batch, k)
            loss = out["loss"] if isinstance(out, dict) else out
            trainer.strategy.backward(loss, opt)
            return loss

        if swap is not None:
            swap.on_train_batch_start(trainer, pl_module, batch, k)
        trainer.strategy.optimizer_step(opt, closure)
        if swap is not None:
            swap.on_train_batch_end(trainer, pl_module, None, batch, k)
            if swap.history:
                act[0] = swap.history[-1].get("measured_resident_bytes", 0)
        opt.zero_grad(set_to_none=True)
        if not cpu:
            return 0
        state = sum(p.numel() * p.element_size() for p in pl_module.parameters()) * 2
        state += sum(
            v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )
        return act[0] + state

    def _critical_batch(self, trainer, pl_module, local: int, world: int) -> float:
        """Critical batch from the gradient noise scale, halves of the chosen local batch as B_small."""
        if local < 2:
            return math.nan
        lightning_setattr(pl_module, self.batch_size_attr, local)
        batches = self._batches(trainer, pl_module, self.noise_steps, local) or []
        est = NoiseScaleEstimator()
        params = [p for p in pl_module.parameters() if p.requires_grad]
        for k, batch in enumerate(batches):
            batch = trainer.strategy.batch_to_device(batch)
            grads = []
            for half in split_batch(batch, 2):
                with trainer.strategy.precision_plugin.train_step_context():
                    out = pl_module.training_step(half, k)
                loss = out["loss"] if isinstance(out, dict) else out
                grads.append([g.float() if g is not None else None for g in torch.autograd.grad(loss, params, allow_unused=True)])
            small = (flat_grad_sq_norm(grads[0]) + flat_grad_sq_norm(grads[1])) / 2
            big = flat_grad_sq_norm(
                [(a + b) / 2 if a is not None else None for a, b in zip(grads[0], grads[1])]
            )
            est.update(small, big, local // 2, 2 * (local // 2))
        if not est.g2:
            return math.nan
        g2 = _reduce(trainer, sum(est.g2) / len(est.g2), "mean")
        s = _reduce(trainer, sum(est.s) / len(est.s), "mean")
        return math.inf if g2 <= 0 else max(s / g2, 0.0)

    # ------------------------------------------------------------------------------- state / apply
    def _save_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return {
            "model": _to_cpu(pl_module.state_dict()),
            "optimizers": [_to_cpu(o.state_dict()) for o in trainer.optimizers],
            "schedulers": [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
            "scaler": copy.deepcopy(scaler.state_dict()) if scaler is not None else None,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "batch": lightning_getattr(pl_module, self.batch_size_attr),
        }

    def _restore_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule, s: dict[str, Any]) -> None:
        pl_module.load_state_dict(s["model"])
        for o, st in zip(trainer.optimizers, s["optimizers"]):
            o.load_state_dict(st)
            o.zero_grad(set_to_none=True)
        for c, st in zip(trainer.lr_scheduler_configs, s["schedulers"]):
            c.scheduler.load_state_dict(st)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and s["scaler"] is not None:
            scaler.load_state_dict(s["scaler"])
        torch.set_rng_state(s["rng"])
        if s["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(s["cuda_rng"])
        lightning_setattr(pl_module, self.batch_size_attr, s["batch"])

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, d: dict[str, Any], world: int) -> None:
        lightning_setattr(pl_module, self.batch_size_attr, d["local_batch_size"])
        if lightning_hasattr(pl_module, self.lr_attr):
            lightning_setattr(pl_module, self.lr_attr, d["lr"])
        if self.warmup_steps and lightning_hasattr(pl_module, "warmup_steps"):
            lightning_setattr(pl_module, "warmup_steps", self.warmup_steps)
        # optimizers already exist: rescale their groups (keeping per-group ratios) and scheduler bases
        factors: dict[int, float] = {}
        for opt in trainer.optimizers:
            g0 = opt.param_groups[0]
            base = g0.get("initial_lr", g0["lr"])
            factor = factors[id(opt)] = d["lr"] / base if base else 1.0
            for g in opt.param_groups:
                g["lr"] *= factor
                if "initial_lr" in g:
                    g["initial_lr"] *= factor
        for c in trainer.lr_scheduler_configs:
            factor = factors.get(id(getattr(c.scheduler, "optimizer", None)), 1.0)
            if hasattr(c.scheduler, "base_lrs"):
                c.scheduler.base_lrs = [b * factor for b in c.scheduler.base_lrs]
            if hasattr(c.scheduler, "_last_lr"):
                c.scheduler._last_lr = [g["lr"] for g in c.scheduler.optimizer.param_groups]

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
                    {"bs_search/batch": t.batch, "bs_search/throughput": t.throughput, "bs_search/ok": float(t.status == "ok")},
                    step=i,
                )
            logger.log_metrics(
                {"bs_search/chosen_batch": d["batch_size"], "bs_search/lr": d["lr"]}, step=len(self.trials)
            )


def _reduce(trainer: pl.Trainer, value: float, op: str) -> float:
    """All-reduce a number across ranks. The tensor lives on the strategy's root device: NCCL only reduces
    CUDA tensors, gloo CPU ones, and Lightning's strategy knows which one this process uses."""
    t = torch.tensor(float(value), dtype=torch.float64, device=trainer.strategy.root_device)
    return float(trainer.strategy.reduce(t, reduce_op=op))
