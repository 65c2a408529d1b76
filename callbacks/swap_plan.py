"""The planner of activation swap-out: which saved tensors to offload, and when to bring each back.

Searches candidate sets with the performance model of :mod:`callbacks.swap_model` so that the predicted peak
stays under the memory budget with the least exposed transfer time. Pure functions, testable without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from callbacks.swap_model import (
    BACKWARD_START,
    Bandwidth,
    SimResult,
    StepProfile,
    assign_triggers,
    groups_of,
    simulate,
    sorted_triggers,
)

__all__ = ["BACKWARD_START", "SwapPlan", "plan_swap"]


@dataclass
class SwapPlan:
    swap: frozenset[int]  # record indices to offload
    prefetch: dict[str, list[int]]  # trigger key -> record indices to start copying back
    budget: float
    baseline_peak: int
    predicted_peak: int
    predicted_step_time: float
    baseline_step_time: float
    swapped_bytes: int
    feasible: bool
    strategy: str = "none"

    @property
    def exposed_time(self) -> float:
        return self.predicted_step_time - self.baseline_step_time


@dataclass
class _Candidate:
    """A swap set as the model sees it: chosen storage groups, their records, triggers and prediction."""

    chosen: list[int]
    swap: set[int]
    trigger_of: dict[int, int]
    result: SimResult


class _Search:
    """The greedy search of :func:`plan_swap` over one profile, budget and link."""

    def __init__(self, profile: StepProfile, budget: float, bw: Bandwidth) -> None:
        self.profile, self.budget, self.bw = profile, budget, bw
        self.groups = groups_of(profile)
        self.base, _ = simulate(profile, set(), bw, {})

    def candidates(self) -> list[int]:
        return [g for g, rs in self.groups.items() if all(r.eligible for r in rs)]

    def orders(self, cands: list[int]) -> dict[str, list[int]]:
        """Earliest first (longest reuse distance, as in vDNN / AccUDNN), largest first (fewest copies), and
        best hide ratio first (time to hide behind over copy time)."""
        F, bw, groups = self.profile.forward_time, self.bw, self.groups

        def info(g: int) -> tuple[float, float, float]:
            rs = groups[g]
            first = min(r.pack_time for r in rs)
            need = min(r.need_time for r in rs)
            nbytes = sum(r.nbytes for r in rs)
            copy = 2 * len(rs) * bw.latency + nbytes / bw.d2h + nbytes / bw.h2d
            hide = (F - first) + (need if math.isfinite(need) else self.profile.backward_time)
            return first, hide, copy

        meta = {g: info(g) for g in cands}
        return {
            "earliest": sorted(cands, key=lambda g: meta[g][0]),
            "largest": sorted(cands, key=lambda g: (-groups[g][0].group_bytes, meta[g][0])),
            "hideable": sorted(cands, key=lambda g: (-meta[g][1] / max(meta[g][2], 1e-12), meta[g][0])),
        }

    def evaluate(self, chosen: list[int]) -> _Candidate:
        """Simulate a set of groups; move the triggers of stalled prefetches earlier for a few rounds."""
        profile, bw = self.profile, self.bw
        swap = {r.index for g in chosen for r in self.groups[g]}
        trig = assign_triggers(profile, swap, bw)
        res, stall = simulate(profile, swap, bw, trig)
        shift: dict[int, int] = {}
        for _ in range(3):
            late = [i for i, s in stall.items() if s > 0 and trig.get(i, 0) > 0]
            if not late:
                break
            for i in late:
                shift[i] = shift.get(i, 0) + 1
            t2 = assign_triggers(profile, swap, bw, shift=shift)
            r2, s2 = simulate(profile, swap, bw, t2)
            if r2.exposed_time <= res.exposed_time and r2.peak_bytes <= max(self.budget, res.peak_bytes):
                res, stall, trig = r2, s2, t2
            else:
                break
        return _Candidate(list(chosen), swap, trig, res)

    def greedy(self, order: list[int]) -> _Candidate:
        """Take groups in ``order`` until the budget holds; if it never does, the least peak seen."""
        budget = self.budget
        cur = _Candidate([], set(), {}, self.base)
        lowest = cur
        it = iter(order)
        exhausted = False
        while True:
            # add groups until the cheap estimate covers the remaining gap, then simulate
            need = cur.result.peak_bytes - budget
            gained = 0
            chosen = list(cur.chosen)
            while gained < need:
                g = next(it, None)
                if g is None:
                    exhausted = True
                    break
                chosen.append(g)
                gained += self.groups[g][0].group_bytes
            cur = self.evaluate(chosen)
            if _rank(cur) < _rank(lowest):
                lowest = cur
            if cur.result.peak_bytes <= budget or exhausted or gained == 0:
                break
        if cur.result.peak_bytes > budget:
            # infeasible (e.g. a link too slow to drain the queue): peak is not monotone in the
            # prefix length, so also scan log-spaced prefixes and keep the least peak seen
            k = 1
            while k < len(order):
                c = self.evaluate(order[:k])
                if _rank(c) < _rank(lowest):
                    lowest = c
                k *= 2
            cur = lowest
        return cur

    def prune(self, cand: _Candidate, max_prune: int) -> _Candidate:
        """Drop groups, latest first, whose removal keeps the peak under the cap and exposes no more time."""
        cap = max(self.budget, cand.result.peak_bytes)
        for g in list(reversed(cand.chosen))[:max_prune]:
            trial = self.evaluate([c for c in cand.chosen if c != g])
            if trial.result.peak_bytes <= cap and trial.result.exposed_time <= cand.result.exposed_time + 1e-9:
                cand = trial
        return cand


def _rank(c: _Candidate) -> tuple[int, float]:
    return c.result.peak_bytes, c.result.exposed_time


def plan_swap(
    profile: StepProfile,
    budget: float,
    bw: Bandwidth,
    max_prune: int = 64,
) -> SwapPlan:
    """Choose saved tensors to offload so the predicted peak stays <= ``budget`` with least exposed time.

    Greedy over a few candidate orderings, each followed by a pruning pass; the ordering with the smallest
    predicted exposed time wins (or, if none fits the budget, the smallest peak). Ineligible records are
    never chosen.
    """
    search = _Search(profile, budget, bw)
    base = search.base
    empty = SwapPlan(frozenset(), {}, budget, base.peak_bytes, base.peak_bytes, base.step_time, base.step_time, 0, True)
    if base.peak_bytes <= budget:
        return empty
    cands = search.candidates()
    if not cands:
        empty.feasible = False
        return empty
    best: tuple | None = None
    for name, order in search.orders(cands).items():
        cand = search.greedy(order)
        if cand.chosen:
            cand = search.prune(cand, max_prune)
        res = cand.result
        feasible = res.peak_bytes <= budget
        key = (not feasible, res.exposed_time if feasible else res.peak_bytes, res.swapped_bytes)
        if best is None or key < best[0]:
            best = (key, name, cand, feasible)
    assert best is not None
    _, name, cand, feasible = best
    trig_list = sorted_triggers(profile)
    prefetch: dict[str, list[int]] = {}
    for idx in sorted(i for i in cand.swap if i in cand.trigger_of):
        prefetch.setdefault(trig_list[cand.trigger_of.get(idx, 0)].key, []).append(idx)
    res = cand.result
    return SwapPlan(
        frozenset(cand.swap),
        prefetch,
        budget,
        base.peak_bytes,
        res.peak_bytes,
        res.step_time,
        base.step_time,
        res.swapped_bytes,
        feasible,
        name,
    )
