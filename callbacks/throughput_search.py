"""Which global batch sizes to measure, and which one to keep.

Pure functions over a ``measure(global_batch) -> Trial`` callable: the search knows nothing about
Lightning, devices or clocks, so its decisions can be tested against made-up throughput curves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Status = str  # "ok" | "oom" | "over_budget" | "data"


@dataclass
class Trial:
    """One measurement of a global batch size."""

    batch: int  # global batch size
    throughput: float  # samples/s (global)
    step_time: float  # s per optimizer step
    peak_bytes: int  # peak device memory (CUDA) or estimated activation+state bytes (CPU)
    status: Status

    @property
    def ok(self) -> bool:
        return self.status == "ok"


Measure = Callable[[int], Trial]


def round_to_world(batch: int, world: int) -> int:
    """Nearest multiple of the world size, at least one sample per rank: every rank gets the same local batch."""
    return max(world, int(round(batch / world)) * world)


def merge_trials(trials: Iterable[Trial]) -> list[Trial]:
    """One trial per batch: repeats averaged, and a batch fails if any of its repeats did."""
    by_batch: dict[int, list[Trial]] = {}
    for t in trials:
        by_batch.setdefault(t.batch, []).append(t)
    merged = []
    for b, ts in by_batch.items():
        bad = [t for t in ts if not t.ok]
        if bad:
            merged.append(bad[0])
            continue
        merged.append(Trial(b, sum(t.throughput for t in ts) / len(ts), sum(t.step_time for t in ts) / len(ts),
                            max(t.peak_bytes for t in ts), "ok"))
    return merged


def choose_batch(trials: Iterable[Trial], tolerance: float) -> Trial:
    """Smallest batch whose throughput (repeats averaged) is within ``tolerance`` of the best: past the
    device's saturation point a larger batch only costs memory."""
    ok = [t for t in merge_trials(trials) if t.ok]
    if not ok:
        raise RuntimeError("no batch size trial succeeded")
    best = max(t.throughput for t in ok)
    return min((t for t in ok if t.throughput >= (1 - tolerance) * best), key=lambda t: t.batch)


def cap_at_critical_batch(chosen: Trial, trials: Iterable[Trial], critical_batch: float) -> Trial:
    """Past the critical batch a larger batch no longer cuts the steps to a given loss: keep the largest
    measured batch at or below it when that is smaller than ``chosen`` (the smallest measured one if none
    is). A non-finite estimate caps nothing."""
    if not math.isfinite(critical_batch):
        return chosen
    ok = [t for t in merge_trials(trials) if t.ok]
    fitting = [t for t in ok if t.batch <= max(critical_batch, 1)]
    if not fitting:
        return min(ok, key=lambda t: t.batch)
    capped = max(fitting, key=lambda t: t.batch)
    return capped if capped.batch < chosen.batch else chosen


@dataclass
class ThroughputSearch:
    """Doubling, then refinement, then confirmation of the fastest batches.

    Doubling finds the region cheaply (an OOM ends it); refinement spends ``refine_steps`` trials on
    midpoints where the decision could still move; confirmation re-times the ``confirm_top`` fastest
    batches because a single noisy trial (another job, a clock change) must not decide alone.
    """

    max_batch: int = 4096
    max_trials: int = 12
    refine_steps: int = 2
    tolerance: float = 0.05
    confirm_top: int = 3

    def run(self, measure: Measure, start: int, world: int = 1, trials: list[Trial] | None = None) -> list[Trial]:
        """Measure from global batch ``start``; returns ``trials``, extended in place so an interrupted
        search still leaves its table behind."""
        trials = [] if trials is None else trials

        def trial(b: int) -> Trial:
            t = measure(b)
            trials.append(t)
            return t

        fail = self._double(trial, trials, start, world)
        self._refine(trial, trials, fail, world)
        self._confirm(trial, trials)
        return trials

    def run_candidates(
        self, measure: Measure, candidates: Iterable[int], world: int = 1, trials: list[Trial] | None = None
    ) -> list[Trial]:
        """Brute force: measure each candidate once (rounded to the world size)."""
        trials = [] if trials is None else trials
        for b in candidates:
            trials.append(measure(round_to_world(b, world)))
        return trials

    def choose(self, trials: Iterable[Trial]) -> Trial:
        return choose_batch(trials, self.tolerance)

    def _double(self, trial: Measure, trials: list[Trial], start: int, world: int) -> int | None:
        """Double until a failure or a limit; returns the smallest failing batch seen (None: none failed)."""
        b = start
        fail: int | None = None
        while b <= self.max_batch and len(trials) < self.max_trials:
            if not trial(b).ok:
                fail = b
                break
            b *= 2
        while not any(t.ok for t in trials) and fail is not None and fail > world:
            fail = round_to_world(fail // 2, world)  # even the first batch failed: halve until one fits
            if trial(fail).ok:
                fail = fail * 2
                break
        return fail

    def _refine(self, trial: Measure, trials: list[Trial], fail: int | None, world: int) -> None:
        for _ in range(self.refine_steps):
            if len(trials) >= self.max_trials:
                break
            ok = sorted((t for t in trials if t.ok), key=lambda t: t.batch)
            if not ok:
                break
            chosen = self.choose(trials)
            largest = ok[-1]
            nxt = None
            if chosen.batch == largest.batch and fail is not None:
                nxt = round_to_world((largest.batch + fail) // 2, world)  # still rising: probe upwards
            else:
                smaller = [t.batch for t in ok if t.batch < chosen.batch]
                if smaller:
                    nxt = round_to_world((smaller[-1] + chosen.batch) // 2, world)  # smaller, as fast?
            if nxt is None or nxt in {t.batch for t in trials}:
                break
            if not trial(nxt).ok and (fail is None or nxt < fail):
                fail = nxt

    def _confirm(self, trial: Measure, trials: list[Trial]) -> None:
        """Re-time the fastest batches (fastest first) so the decision rests on two measurements each."""
        ranked = sorted((t for t in merge_trials(trials) if t.ok), key=lambda t: -t.throughput)
        for t in ranked[: max(0, self.confirm_top)]:
            trial(t.batch)
