"""BatchSizeLRSearch: the pure search strategy, choice vs brute force and vs Lightning's BatchSizeFinder,
state restore, lr rules and rescaled schedulers, logging during trials, OOM handling, noise scale, and
(slow) a 2-process DDP run agreeing on the decision."""

from __future__ import annotations

import copy
import math
import time

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BatchSizeFinder
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import callbacks.trial_runner as trial_runner
from callbacks import BatchSizeLRSearch, SwapOutCallback
from callbacks.lr_scaling import rescale_lrs, scale_lr
from callbacks.noise_scale import NoiseScaleEstimator, noise_scale_terms, split_batch
from callbacks.throughput_search import ThroughputSearch, Trial, cap_at_critical_batch, choose_batch


class SimulatedClock:
    """Stands in for ``time`` inside the trial runner: trials time the simulated device, not this machine,
    so the choice is deterministic however loaded the CPU is. (ddp_spawn workers keep the real clock
    and really sleep.)"""

    now = 0.0

    @classmethod
    def perf_counter(cls) -> float:
        return cls.now


@pytest.fixture(autouse=True)
def _simulated_clock(monkeypatch):
    monkeypatch.setattr(trial_runner, "time", SimulatedClock)
    SimulatedClock.now = 0.0


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def step_seconds(b: int) -> float:
    """Simulated device: fixed cost until 16 samples saturate it, then linear (throughput plateaus)."""
    return 0.0006 * max(b, 16)


class Data(pl.LightningDataModule):
    def __init__(self, batch_size: int = 4, n: int = 512) -> None:
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g) + 0.5 * torch.randn(n, 1, generator=g)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True)


class Model(pl.LightningModule):
    def __init__(
        self, lr: float = 0.01, oom_above: int | None = None, sleep: bool = True, adam: bool = True, warmup_steps: int = 0
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        b = x.shape[0]
        if self.hparams.oom_above is not None and b > self.hparams.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        if trial_runner.time is SimulatedClock:
            SimulatedClock.now += step_seconds(b)
        elif self.hparams.sleep:
            time.sleep(step_seconds(b))
        loss = nn.functional.mse_loss(self.net(x), y)
        self.steps_run += 1
        self.log("loss", loss)  # during trials too: a real result collection, not a patched-out log
        self.log("steps", 1.0, on_step=False, on_epoch=True, reduce_fx="sum")
        return loss

    def configure_optimizers(self):
        opt = (torch.optim.Adam if self.hparams.adam else torch.optim.SGD)(self.parameters(), lr=self.lr)
        if not self.hparams.warmup_steps:
            return opt
        warm = self.hparams.warmup_steps  # the module's own (and only) warm-up
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Probe(pl.Callback):
    """Captures state at train start (after the search) and the lr seen by the first optimizer steps."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.started = False

    def on_train_start(self, trainer, pl_module):
        self.params = copy.deepcopy(pl_module.state_dict())
        self.opt_state = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.start_lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.started = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.started:  # trial steps before training also run this hook
            self.lrs.append(optimizer.param_groups[0]["lr"])


def run(search: pl.Callback | None, model: Model, dm: Data, steps: int = 2, extra=(), **kw) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=([search] if search else []) + list(extra),
        **kw,
    )
    trainer.fit(model, datamodule=dm)
    return trainer


def measured(trials: list[Trial]) -> dict[int, float]:
    return {t.batch: t.throughput for t in trials if t.status == "ok"}


def test_lr_rules():
    assert scale_lr(0.1, 256, 1024, "linear") == pytest.approx(0.4)
    assert scale_lr(1e-4, 32, 128, "sqrt") == pytest.approx(2e-4)
    assert scale_lr(0.1, 8, 64, "none") == 0.1
    with pytest.raises(ValueError):
        scale_lr(0.1, 8, 64, "cubic")
    with pytest.raises(TypeError):  # one warm-up: the module's scheduler's, not the search's
        BatchSizeLRSearch(warmup_steps=10)


def _two_groups(lr: float) -> torch.optim.Optimizer:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 2 * lr}], lr=lr)


@pytest.mark.parametrize(
    "make",
    [
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 4)),  # warm-up, from base_lrs
        lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.5),  # chainable, from the groups' lr
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    ],
    ids=["lambda", "exponential", "cosine"],
)
def test_rescaled_scheduler_next_lr(make):
    """After rescaling mid-schedule, the scheduler's next lrs are the unscaled ones x the factor, group
    ratios kept, and ``get_last_lr()`` agrees with the param groups again after its next step."""
    ref_opt, opt = _two_groups(0.1), _two_groups(0.1)
    ref, sched = make(ref_opt), make(opt)
    for o, s in ((ref_opt, ref), (opt, sched)):
        o.step()
        s.step()
    rescale_lrs([opt], [sched], 0.3)  # base 0.1 -> 0.3: factor 3
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([3 * g["lr"] for g in ref_opt.param_groups])
    for _ in range(3):
        for o, s in ((ref_opt, ref), (opt, sched)):
            o.step()
            s.step()
        assert sched.get_last_lr() == pytest.approx([3 * lr for lr in ref.get_last_lr()])
        assert sched.get_last_lr() == pytest.approx([g["lr"] for g in opt.param_groups])
    assert sched.base_lrs == pytest.approx([0.3, 0.6])


# ------------------------------------------------------------------------- pure search strategy
def fake_measure(curve, fail_above: int, log: list[int]):
    """``measure`` for a made-up device: samples/s from ``curve``, OOM above ``fail_above``."""

    def measure(b: int) -> Trial:
        log.append(b)
        if b > fail_above:
            return Trial(b, 0.0, math.inf, 0, "oom")
        thr = curve(b)
        return Trial(b, thr, b / thr, b, "ok")

    return measure


def plateau(b: int) -> float:
    return 100.0 * min(b, 16)  # samples/s rise until 16 saturate the device, then stay flat


def test_search_strategy_doubling_refinement_confirmation():
    log: list[int] = []
    trials = ThroughputSearch(max_batch=4096, max_trials=12, refine_steps=2, tolerance=0.05, confirm_top=3).run(
        fake_measure(plateau, 64, log), start=2
    )
    assert [t.batch for t in trials] == log
    # doubling up to the OOM at 128; chosen 16 (start of the plateau): two midpoints below it, each
    # slower; then the 3 fastest (16, 32, 64: a tie, first measured first) timed again
    assert log == [2, 4, 8, 16, 32, 64, 128, 12, 14, 16, 32, 64]
    assert trials[6].status == "oom"
    assert choose_batch(trials, 0.05).batch == 16


def test_search_strategy_halves_when_first_batch_fails_and_respects_world():
    log: list[int] = []
    trials = ThroughputSearch(refine_steps=0, confirm_top=0).run(fake_measure(plateau, 6, log), start=32, world=2)
    assert log == [32, 16, 8, 4]  # halved (multiples of the world size) until one fits
    assert choose_batch(trials, 0.0).batch == 4
    assert all(b % 2 == 0 for b in log)


def test_search_strategy_rising_throughput_probes_upwards_and_caps():
    log: list[int] = []
    trials = ThroughputSearch(refine_steps=1, confirm_top=0).run(fake_measure(lambda b: b, 40, log), start=8)
    assert log == [8, 16, 32, 64, 48]  # still rising at the largest fitting batch: midpoint towards the OOM
    chosen = choose_batch(trials, 0.0)
    assert chosen.batch == 32
    assert cap_at_critical_batch(chosen, trials, 20.0).batch == 16  # largest measured batch <= critical
    assert cap_at_critical_batch(chosen, trials, 4.0).batch == 8  # none fits: the smallest measured
    assert cap_at_critical_batch(chosen, trials, math.inf) is chosen
    assert cap_at_critical_batch(chosen, trials, math.nan) is chosen


def test_search_strategy_max_trials_and_candidates():
    log: list[int] = []
    ThroughputSearch(max_trials=3, refine_steps=2, confirm_top=0).run(fake_measure(plateau, 10**6, log), start=1)
    assert log == [1, 2, 4]
    got = ThroughputSearch().run_candidates(fake_measure(plateau, 16, []), [3, 8, 40], world=2)
    assert [(t.batch, t.status) for t in got] == [(4, "ok"), (8, "ok"), (40, "oom")]


def test_callback_decision_is_the_strategys_on_the_same_measurements():
    """Replaying the callback's measurements through the pure strategy asks for the same batches and
    reaches the same choice: the callback adds nothing to the decision."""
    search = BatchSizeLRSearch(init_batch=2, tolerance=0.05, trial_steps=2)
    run(search, Model(oom_above=64), Data(batch_size=8), steps=1)
    replay = iter(search.trials)
    asked: list[int] = []

    def measure(b: int) -> Trial:
        asked.append(b)
        return next(replay)

    trials = ThroughputSearch(tolerance=0.05).run(measure, start=2)
    assert asked == [t.batch for t in search.trials]
    assert choose_batch(trials, 0.05).batch == search.result["batch_size"]


def test_noise_scale_terms_exact_and_split():
    # |G_B|^2 = |G|^2 + S / B with |G|^2 = 4, S = 32
    g2, s = noise_scale_terms(4 + 32 / 8, 4 + 32 / 32, 8, 32)
    assert g2 == pytest.approx(4.0) and s == pytest.approx(32.0)
    est = NoiseScaleEstimator()
    est.update(4 + 32 / 8, 4 + 32 / 32, 8, 32)
    assert est.critical_batch == pytest.approx(8.0)
    parts = split_batch((torch.arange(6), {"a": torch.ones(6, 2)}), 2)
    assert parts[1][0].tolist() == [3, 4, 5] and parts[0][1]["a"].shape == (3, 2)


def test_choose_batch_tolerance():
    trials = [Trial(8, 100, 0, 0, "ok"), Trial(16, 190, 0, 0, "ok"), Trial(32, 200, 0, 0, "ok"), Trial(64, 0, 0, 0, "oom")]
    assert choose_batch(trials, 0.0).batch == 32
    assert choose_batch(trials, 0.1).batch == 16
    # a repeat measurement is averaged in: one lucky trial of 16 no longer wins at tolerance 0
    repeats = trials + [Trial(16, 230, 0, 0, "ok"), Trial(32, 200, 0, 0, "ok")]
    assert choose_batch(repeats, 0.0).batch == 16  # (190 + 230) / 2 = 210 > 200
    assert choose_batch(trials + [Trial(16, 0, 0, 0, "oom")], 0.1).batch == 32  # any failure fails the batch


def test_search_within_tolerance_of_brute_force_and_restores_state():
    torch.manual_seed(0)
    model = Model(lr=0.01, oom_above=64)
    init = copy.deepcopy(model.state_dict())
    dm = Data(batch_size=8)
    search = BatchSizeLRSearch(init_batch=2, tolerance=0.05, lr_rule="sqrt", trial_steps=3)
    probe = Probe()
    run(search, model, dm, extra=[probe])
    d = search.result
    # model and optimizer state are the pre-search ones when training starts
    for k, v in init.items():
        assert torch.equal(probe.params[k], v)
    assert probe.opt_state["state"] == {}
    # same run: brute force over every power of two that fits
    brute = BatchSizeLRSearch(candidates=[2, 4, 8, 16, 32, 64], trial_steps=3)
    run(brute, Model(lr=0.01, oom_above=64), Data(batch_size=8), steps=1)
    best = max(measured(brute.trials).values())
    # the chosen batch's throughput (brute-force measurement) is within 10% of the best
    assert measured(brute.trials)[d["batch_size"]] >= 0.9 * best
    assert any(t.status == "oom" for t in search.trials)  # doubling ran into the (simulated) OOM cleanly
    # lr matched to the chosen batch by the sqrt rule from lr 0.01 at batch 8, in module, optimizer, datamodule
    assert d["lr"] == pytest.approx(0.01 * math.sqrt(d["batch_size"] / 8))
    assert model.lr == pytest.approx(d["lr"]) and model.hparams.lr == pytest.approx(d["lr"])
    assert probe.start_lr == pytest.approx(d["lr"])
    assert dm.batch_size == d["batch_size"]


def test_vs_lightning_batch_size_finder(tmp_path):
    """BatchSizeFinder picks the largest batch that fits; the throughput plateau makes it wasteful."""
    bsf = BatchSizeFinder(mode="power", steps_per_trial=2, init_val=2, max_trials=8)
    dm_bsf = Data(batch_size=2)
    run(bsf, Model(oom_above=64), dm_bsf, steps=1, default_root_dir=str(tmp_path))
    assert bsf.optimal_batch_size == 64 and dm_bsf.batch_size == 64

    search = BatchSizeLRSearch(init_batch=2, tolerance=0.1, lr_rule="linear", trial_steps=3)
    dm = Data(batch_size=8)
    run(search, Model(oom_above=64), dm, steps=1)
    thr = measured(search.trials)
    b = search.result["batch_size"]
    assert b < bsf.optimal_batch_size  # smaller batch ...
    assert thr[b] >= 0.85 * thr[64]  # ... at (nearly) the same samples/s


class FitStartRng(pl.Callback):
    """Global RNG state in ``on_fit_start``: before the search when placed before it, after it otherwise."""

    def on_fit_start(self, trainer, pl_module):
        self.rng = torch.get_rng_state()


def test_oom_everywhere_above_and_training_continues():
    search = BatchSizeLRSearch(init_batch=4, tolerance=0.0, trial_steps=2, lr_rule="linear")
    model = Model(lr=0.1, oom_above=16, sleep=False, adam=False, warmup_steps=3)
    dm = Data(batch_size=4)
    probe, before, after = Probe(), FitStartRng(), FitStartRng()
    trainer = run(None, model, dm, steps=5, extra=[before, search, after, probe])
    assert torch.equal(before.rng, after.rng)  # trials shuffled data: the RNG is restored all the same
    assert trainer.global_step == 5
    statuses = {t.batch: t.status for t in search.trials}
    assert statuses[32] == "oom" and all(s == "ok" for b, s in statuses.items() if b <= 16)
    b = search.result["batch_size"]
    assert b <= 16
    target = 0.1 * b / 4
    # the module's own warm-up over 3 steps, ramping to the rescaled lr; nothing added on top
    assert probe.lrs[:4] == pytest.approx([target / 3, 2 * target / 3, target, target])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(target)
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == pytest.approx([target])


def test_training_step_logs_during_trials_without_leaking():
    """``self.log`` in ``training_step`` runs for real during trials, and none of it reaches training's
    metrics: the epoch sum of ``steps`` counts the real steps only."""
    model = Model(sleep=False)
    search = BatchSizeLRSearch(init_batch=4, max_batch=16, trial_steps=1, confirm_top=0, refine_steps=0)
    trainer = run(search, model, Data(batch_size=4), steps=3)
    assert model.steps_run > 3  # trials ran training_step
    assert float(trainer.callback_metrics["steps"]) == 3.0


def test_critical_batch_cap_and_swap_active():
    swap = SwapOutCallback(memory_budget=256, min_bytes=64, profile_steps=1)
    search = BatchSizeLRSearch(
        init_batch=4, max_batch=64, tolerance=0.0, trial_steps=2, critical_batch=True, noise_steps=4
    )
    run(search, Model(sleep=False), Data(batch_size=4), steps=2, extra=[swap])
    d = search.result
    ok = sorted(t.batch for t in search.trials if t.status == "ok")
    b_crit = d["critical_batch"]
    assert b_crit > 0 and math.isfinite(b_crit)  # noisy regression targets: a finite noise scale
    uncapped = choose_batch(search.trials, 0.0).batch
    fitting = [b for b in ok if b <= b_crit]
    expected = min(uncapped, max(fitting)) if fitting else ok[0]
    assert d["batch_size"] == expected
    assert any(h["mode"] == "execute" and h["swapped_bytes"] > 0 for h in swap.history)  # swap ran in trials


def _ddp_worker_result(tmp_path):
    return sorted(tmp_path.glob("rank*.txt"))


class _Dump(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module):
        with open(f"{self.path}/rank{trainer.global_rank}.txt", "w") as f:
            f.write(f"{pl_module.trainer.datamodule.batch_size} {trainer.optimizers[0].param_groups[0]['lr']:.10g}")


@pytest.mark.slow
def test_ddp_ranks_agree(tmp_path):
    search = BatchSizeLRSearch(init_batch=4, max_batch=64, tolerance=0.05, trial_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[search, _Dump(str(tmp_path))],
    )
    trainer.fit(Model(oom_above=32), datamodule=Data(batch_size=4))
    files = _ddp_worker_result(tmp_path)
    assert len(files) == 2
    a, b = (f.read_text() for f in files)
    assert a == b
    local = int(a.split()[0])
    assert 2 * local <= 64  # global batch split over 2 ranks; the local 32 OOMs so global <= 64
