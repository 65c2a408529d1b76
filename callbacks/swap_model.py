"""The performance model of activation swap-out (AccUDNN's memory optimizer): a step's timeline, pure functions.

What the planner (:mod:`callbacks.swap_plan`) asks of a candidate set of saved tensors: the peak of resident
saved bytes, the transfer time left exposed, and the step time. Pure functions over a :class:`StepProfile`, so
the model is unit-testable without a GPU.

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


def groups_of(profile: StepProfile) -> dict[int, list[SavedRecord]]:
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
    trig = sorted_triggers(profile)
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


def sorted_triggers(profile: StepProfile) -> list[Trigger]:
    return [Trigger(BACKWARD_START, 0.0)] + sorted(profile.triggers, key=lambda t: t.time)


def simulate(
    profile: StepProfile, swap: set[int], bw: Bandwidth, trigger_of: dict[int, int] | None = None
) -> tuple[SimResult, dict[int, float]]:
    """Predict peak resident saved bytes, exposed transfer time and step time for a swap set.

    Returns the result and, per swapped record, its stall (ready time minus need time, >0 means exposed).
    """
    recs = sorted(profile.records, key=lambda r: r.pack_time)
    groups = groups_of(profile)
    swapped_groups = {g for g, rs in groups.items() if all(r.index in swap for r in rs)}
    trig = sorted_triggers(profile)
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
