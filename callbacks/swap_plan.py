"""Performance model and planner for activation swap-out (AccUDNN's memory optimizer).

Pure functions over a :class:`StepProfile` so the planning logic is unit-testable without a GPU.

Timeline model (all times in seconds, sizes in bytes):

* forward runs for ``forward_time``; saved tensor ``r`` is packed at ``pack_time``; a swapped tensor is
  queued on a single FIFO device->host stream at its pack time and its device memory is freed when the
  copy finishes, so swap-out hides behind the *later forward layers*;
* backward starts right after; ``need_time`` is when autograd first unpacks ``r`` (relative to backward
  start); a swapped tensor is copied back on a FIFO host->device stream, issued when its *trigger*
  fires (the backward pre-hook of a later module, or backward start), so swap-in hides behind the
  *backward of the layers after it*. If it is not ready at its need time compute stalls (exposed time).

Peak resident activation memory is the maximum over time of the bytes of saved tensors on the device.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

BACKWARD_START = "<backward-start>"


@dataclass(frozen=True)
class SavedRecord:
    """One tensor saved by autograd for backward, in pack order."""

    index: int  # pack order within the step (runtime key)
    nbytes: int  # bytes moved if swapped
    group: int  # storage id: records sharing a storage free memory only together
    group_bytes: int  # bytes of that storage
    pack_time: float  # s after forward start
    need_time: float  # s after backward start of the first unpack (inf: never unpacked)
    eligible: bool = True  # False for tiny / parameter-derived / non-dense tensors
    owner: str = ""  # module invocation that saved it (diagnostics)


@dataclass(frozen=True)
class Trigger:
    """A point in backward where prefetches can be issued (a module's backward pre-hook)."""

    key: str
    time: float  # s after backward start


@dataclass
class StepProfile:
    records: list[SavedRecord]
    triggers: list[Trigger]
    forward_time: float
    backward_time: float
    module_times: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (fwd s, bwd s)

    @property
    def activation_bytes(self) -> int:
        return sum({r.group: r.group_bytes for r in self.records}.values())


@dataclass(frozen=True)
class Bandwidth:
    d2h: float  # bytes/s device -> host
    h2d: float  # bytes/s host -> device
    latency: float = 10e-6  # s per copy launch


@dataclass
class SimResult:
    peak_bytes: int
    exposed_time: float
    step_time: float
    swapped_bytes: int


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


def _groups(profile: StepProfile) -> dict[int, list[SavedRecord]]:
    out: dict[int, list[SavedRecord]] = {}
    for r in profile.records:
        out.setdefault(r.group, []).append(r)
    return out


def assign_triggers(
    profile: StepProfile, swap: set[int], bw: Bandwidth, lead: float = 1.5, shift: dict[int, int] | None = None
) -> dict[int, int]:
    """Pick for each swapped record the latest trigger that leaves ``lead`` x its copy time before need.

    Returns record index -> position in the time-sorted trigger list (0 is backward start). Issuing as late
    as possible keeps prefetched bytes (which count against the budget) resident for the shortest time.
    """
    trig = _sorted_triggers(profile)
    times = [t.time for t in trig]
    out: dict[int, int] = {}
    for r in profile.records:
        if r.index not in swap or not math.isfinite(r.need_time):
            continue  # never unpacked: never prefetched
        copy = bw.latency + r.nbytes / bw.h2d
        latest = r.need_time - lead * copy
        pos = bisect.bisect_right(times, latest) - 1
        pos = max(pos, 0)
        # must fire strictly before the need
        while pos > 0 and times[pos] >= r.need_time:
            pos -= 1
        if shift:
            pos = max(0, pos - shift.get(r.index, 0))
        out[r.index] = pos
    return out


def _sorted_triggers(profile: StepProfile) -> list[Trigger]:
    return [Trigger(BACKWARD_START, 0.0)] + sorted(profile.triggers, key=lambda t: t.time)


def simulate(
    profile: StepProfile, swap: set[int], bw: Bandwidth, trigger_of: dict[int, int] | None = None
) -> tuple[SimResult, dict[int, float]]:
    """Predict peak resident saved bytes, exposed transfer time and step time for a swap set.

    Returns the result and, per swapped record, its stall (ready time minus need time, >0 means exposed).
    """
    recs = sorted(profile.records, key=lambda r: r.pack_time)
    groups = _groups(profile)
    swapped_groups = {g for g, rs in groups.items() if all(r.index in swap for r in rs)}
    trig = _sorted_triggers(profile)
    if trigger_of is None:
        trigger_of = assign_triggers(profile, swap, bw)
    F = profile.forward_time

    mem: list[tuple[float, int]] = []  # (time, delta bytes)
    # forward: FIFO d2h queue
    d2h_free = 0.0
    done: dict[int, float] = {}
    first_pack: dict[int, float] = {}
    for r in recs:
        first_pack.setdefault(r.group, r.pack_time)
        if r.index in swap:
            start = max(r.pack_time, d2h_free)
            d2h_free = start + bw.latency + r.nbytes / bw.d2h
            done[r.index] = d2h_free
    for g, rs in groups.items():
        mem.append((first_pack[g], rs[0].group_bytes))
        if g in swapped_groups:
            mem.append((max(done[r.index] for r in rs), -rs[0].group_bytes))

    # backward sweep over triggers and needs in nominal order, accumulating stalls
    events: list[tuple[float, int, int]] = [(t.time, 0, i) for i, t in enumerate(trig)]
    events += [(r.need_time, 1, r.index) for r in recs if math.isfinite(r.need_time)]
    events.sort()
    by_trigger: dict[int, list[SavedRecord]] = {}
    for r in recs:
        if r.index in swap and math.isfinite(r.need_time):
            by_trigger.setdefault(trigger_of.get(r.index, 0), []).append(r)
    by_index = {r.index: r for r in recs}
    h2d_free = F
    delay = 0.0
    ready: dict[int, float] = {}
    stall: dict[int, float] = {}
    last_need: dict[int, float] = {}

    def issue(r: SavedRecord, now: float) -> None:
        nonlocal h2d_free
        start = max(now, h2d_free, done[r.index])
        h2d_free = start + bw.latency + r.nbytes / bw.h2d
        ready[r.index] = h2d_free
        mem.append((now, r.nbytes))

    for t, kind, x in events:
        now = F + t + delay
        if kind == 0:
            for r in by_trigger.get(x, []):
                issue(r, now)
            continue
        r = by_index[x]
        if r.index in swap:
            if r.index not in ready:
                issue(r, now)
            wait = ready[r.index] - now
            stall[r.index] = wait
            if wait > 0:
                delay += wait
                now += wait
            mem.append((now, -r.nbytes))
        last_need[r.group] = now
    end = F + profile.backward_time + delay
    for g, rs in groups.items():
        if g not in swapped_groups:
            mem.append((last_need.get(g, end), -rs[0].group_bytes))

    mem.sort(key=lambda e: (e[0], -e[1]))  # allocations before frees at equal times: conservative
    cur = peak = 0
    for _, d in mem:
        cur += d
        peak = max(peak, cur)
    swapped_bytes = sum(by_index[i].nbytes for i in swap if i in by_index)
    base = F + profile.backward_time
    return SimResult(peak, delay, base + delay, swapped_bytes), stall


def plan_swap(
    profile: StepProfile,
    budget: float,
    bw: Bandwidth,
    max_prune: int = 64,
) -> SwapPlan:
    """Choose saved tensors to offload so the predicted peak stays <= ``budget`` with least exposed time.

    Greedy over a few candidate orderings (earliest first: longest reuse distance, as in vDNN/AccUDNN;
    largest first: fewest copies; best hide ratio first), each followed by a pruning pass, then the
    ordering with the smallest predicted exposed time wins. Ineligible records are never chosen.
    """
    base, _ = simulate(profile, set(), bw, {})
    empty = SwapPlan(frozenset(), {}, budget, base.peak_bytes, base.peak_bytes, base.step_time, base.step_time, 0, True)
    if base.peak_bytes <= budget:
        return empty
    groups = _groups(profile)
    cands = [g for g, rs in groups.items() if all(r.eligible for r in rs)]
    if not cands:
        empty.feasible = False
        return empty

    F = profile.forward_time

    def info(g: int) -> tuple[float, float, int, float]:
        rs = groups[g]
        first = min(r.pack_time for r in rs)
        need = min(r.need_time for r in rs)
        nbytes = sum(r.nbytes for r in rs)
        copy = 2 * len(rs) * bw.latency + nbytes / bw.d2h + nbytes / bw.h2d
        hide = (F - first) + (need if math.isfinite(need) else profile.backward_time)
        return first, hide, nbytes, copy

    meta = {g: info(g) for g in cands}
    orders = {
        "earliest": sorted(cands, key=lambda g: meta[g][0]),
        "largest": sorted(cands, key=lambda g: (-groups[g][0].group_bytes, meta[g][0])),
        "hideable": sorted(cands, key=lambda g: (-meta[g][1] / max(meta[g][3], 1e-12), meta[g][0])),
    }

    def evaluate(chosen: list[int]) -> tuple[SimResult, dict[int, int], set[int]]:
        swap = {r.index for g in chosen for r in groups[g]}
        trig = assign_triggers(profile, swap, bw)
        res, stall = simulate(profile, swap, bw, trig)
        # move triggers of stalled records earlier, a few rounds
        shift: dict[int, int] = {}
        for _ in range(3):
            late = [i for i, s in stall.items() if s > 0 and trig.get(i, 0) > 0]
            if not late:
                break
            for i in late:
                shift[i] = shift.get(i, 0) + 1
            t2 = assign_triggers(profile, swap, bw, shift=shift)
            r2, s2 = simulate(profile, swap, bw, t2)
            if r2.exposed_time <= res.exposed_time and r2.peak_bytes <= max(budget, res.peak_bytes):
                res, stall, trig = r2, s2, t2
            else:
                break
        return res, trig, swap

    best: tuple | None = None
    for name, order in orders.items():
        chosen: list[int] = []
        est = base.peak_bytes
        it = iter(order)
        res = base
        trig: dict[int, int] = {}
        swap: set[int] = set()
        exhausted = False
        lowest = (res.peak_bytes, res.exposed_time, [], res, trig, swap)
        while True:
            # add groups until the cheap estimate covers the remaining gap, then simulate
            need = res.peak_bytes - budget
            gained = 0
            while gained < need:
                g = next(it, None)
                if g is None:
                    exhausted = True
                    break
                chosen.append(g)
                gained += groups[g][0].group_bytes
                est -= groups[g][0].group_bytes
            res, trig, swap = evaluate(chosen)
            if (res.peak_bytes, res.exposed_time) < lowest[:2]:
                lowest = (res.peak_bytes, res.exposed_time, list(chosen), res, trig, swap)
            if res.peak_bytes <= budget or exhausted or gained == 0:
                break
        if res.peak_bytes > budget:
            # infeasible (e.g. a link too slow to drain the queue): peak is not monotone in the
            # prefix length, so also scan log-spaced prefixes and keep the least peak seen
            k = 1
            while k < len(order):
                r2, t2, s2 = evaluate(order[:k])
                if (r2.peak_bytes, r2.exposed_time) < lowest[:2]:
                    lowest = (r2.peak_bytes, r2.exposed_time, order[:k], r2, t2, s2)
                k *= 2
            _, _, chosen, res, trig, swap = lowest
        feasible = res.peak_bytes <= budget
        cap = max(budget, res.peak_bytes)
        if chosen:
            pruned = 0
            for g in list(reversed(chosen)):
                if pruned >= max_prune:
                    break
                pruned += 1
                trial = [c for c in chosen if c != g]
                r2, t2, s2 = evaluate(trial)
                if r2.peak_bytes <= cap and r2.exposed_time <= res.exposed_time + 1e-9:
                    chosen, res, trig, swap = trial, r2, t2, s2
        key = (not feasible, res.exposed_time if feasible else res.peak_bytes, res.swapped_bytes)
        if best is None or key < best[0]:
            best = (key, name, res, trig, swap, feasible)
    assert best is not None
    _, name, res, trig, swap, feasible = best
    trig_list = _sorted_triggers(profile)
    prefetch: dict[str, list[int]] = {}
    for idx in sorted(i for i in swap if i in trig):
        prefetch.setdefault(trig_list[trig.get(idx, 0)].key, []).append(idx)
    return SwapPlan(
        frozenset(swap),
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
