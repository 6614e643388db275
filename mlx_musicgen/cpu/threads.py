"""Which BLAS the CPU runs, and the streams the CPU modules spread their work over."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Callable, NamedTuple

import mlx.core as mx
from threadpoolctl import ThreadpoolController

from .. import _linux

_streams: dict[str, tuple[mx.Stream, mx.Stream]] = {}


def portable_requested() -> bool:
    """MLX_MUSICGEN_PORTABLE=1 (or any value but 0/empty): run the portable model as Metal and CUDA do."""
    return os.environ.get("MLX_MUSICGEN_PORTABLE", "") not in ("", "0")


def blas_threads_itself() -> bool:
    """Whether the CPU's BLAS runs each product on every core by itself (MKL). If not (OpenBLAS, one thread),
    the CPU modules parallelise over two streams themselves."""
    return _linux.LOADED == _linux.MKL


def parallel_streams() -> tuple[mx.Stream, mx.Stream]:
    """Two streams of the default device, for work that can run on two CPU cores at once.

    With MKL, one stream twice: MKL's own threads already use every core, and MKL called from two threads
    gets a thread team for each, after which every product runs slower (docs/performance.md)."""
    device = mx.default_device()
    key = str(device)
    if key not in _streams:
        if device == mx.cpu and blas_threads_itself():
            stream = mx.default_stream(device)
            _streams[key] = (stream, stream)
        else:
            _streams[key] = (mx.new_stream(device), mx.new_stream(device))
    return _streams[key]


def fastest_team(time_steps: Callable[[Hashable], list[float]], candidates: list, margin: float = 0.05) -> Hashable:
    """The candidate (a thread team, a form of the decoding step) whose decoding steps run fastest:
    `time_steps(c)` times a few steps with candidate c; the first candidate (the default) is kept unless
    another's median step is faster by more than `margin` (so that noise does not move it)."""
    medians = {n: statistics.median(time_steps(n)) for n in candidates}
    best = min(medians, key=medians.get)
    return best if medians[best] < (1 - margin) * medians[candidates[0]] else candidates[0]


_chosen: dict[tuple, int] = {}


def choose_blas_team(step: Callable[[], None], key: tuple, steps: int = 3) -> int | None:
    """MKL's team for decoding, chosen by measurement once per process and decoder shape (`key`): `step` runs
    one decoding step; the usable cores less one (the default: the busy-machine choice, see _linux) against all
    of them. Whether a second MKL thread reads the weights faster differs from machine to machine and from day
    to day (docs/performance.md). None: MKL is not loaded, the user chose the team, or there is one core."""
    cores = _linux.usable_cores()
    if not _linux.blas_team_is_ours() or cores < 2:
        return None
    if key not in _chosen:

        def time_steps(threads: int) -> list[float]:
            _linux.set_blas_threads(threads)
            step()  # warm-up: the team's threads start
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            return times

        _chosen[key] = fastest_team(time_steps, [max(1, cores - 1), cores])
    _linux.set_blas_threads(_chosen[key])
    return _chosen[key]


_team_lock = threading.RLock()  # one thread at a time resizes the team and puts it back


@contextmanager
def every_core_for_blas() -> Iterator[None]:
    """MKL's team on every usable core for the products evaluated inside (then back to the decoding team): for
    large products, such as MAGNeT's passes over whole clips, where a second thread halves the time instead of
    waiting on memory. Threads using it take turns. Nothing changes where the user chose the team or MKL is not
    loaded."""
    if not _linux.blas_team_is_ours():
        yield
        return
    with _team_lock:
        team = _linux.blas_team()
        _linux.set_blas_threads(_linux.usable_cores())
        try:
            yield
        finally:
            _linux.set_blas_threads(team)


class TeamByTiming:
    """A BLAS thread team for a loop of like steps, chosen while the loop runs: each step takes the team whose
    steps have been fastest lately (an average of its step times that weighs the newest by `weight`), and every
    `probe_every` steps one step takes the next other team, so that a team slowed by another program on a core
    is left within a few steps and taken again once the core is free (docs/performance.md). Teams not yet timed
    go first, in the order given."""

    def __init__(self, teams: list[int], probe_every: int = 16, weight: float = 0.5):
        self.teams, self.probe_every, self.weight = teams, probe_every, weight
        self.seconds: dict[int, float] = {}
        self.steps = 0
        self.probes = 0

    def next_team(self) -> int:
        untimed = [team for team in self.teams if team not in self.seconds]
        if untimed:
            return untimed[0]
        best = min(self.teams, key=self.seconds.__getitem__)
        if self.steps % self.probe_every or len(self.teams) == 1:
            return best
        others = [team for team in self.teams if team != best]
        return others[self.steps // self.probe_every % len(others)]

    def record(self, team: int, seconds: float) -> None:
        """A step of `team` took `seconds`."""
        self.steps += 1
        last = self.seconds.get(team)
        self.seconds[team] = seconds if last is None else self.weight * seconds + (1 - self.weight) * last


class ThreadTeams(NamedTuple):
    sizes: list[int]  # the teams to choose from, the default first
    limit: Callable[[int], AbstractContextManager]  # limit(n): the products inside run on n threads


def numpy_blas_teams() -> ThreadTeams | None:
    """The teams of numpy's own OpenBLAS to choose from (every usable core, one less, one); None where numpy's
    BLAS is not an OpenBLAS that threadpoolctl finds in numpy's wheel (Accelerate, MKL, a system OpenBLAS that
    MLX may share) or the user set its team (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS)."""
    if any(name in os.environ for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")):
        return None
    controller = ThreadpoolController().select(internal_api="openblas", prefix="libscipy_openblas")
    if not controller.lib_controllers:
        return None
    cores = _linux.usable_cores()
    return ThreadTeams(sorted({cores, max(1, cores - 1), 1}, reverse=True),
                       lambda threads: controller.limit(limits=threads))
