"""How many CPU threads torch uses, and why (issue 21).

torch's own default is the machine's core count as OpenMP sees it, which ignores a cgroup CPU
quota (a container limited to 1.5 CPUs on a 16-core host gets 16 threads). Here the count is,
first match wins:
1. the `num_threads` config key;
2. OMP_NUM_THREADS, as torch and OpenMP read it;
3. the cores this process may run on: os.sched_getaffinity, capped by a cgroup v2 quota
   (`cpu.max`: "quota period", rounded up) or a cgroup v1 one (cpu.cfs_quota_us / cpu.cfs_period_us).
During training (FreeCores), a count that the `num_threads` key did not fix is lowered while other
processes keep this process's cores busy, and raised back when they stop. How threads wait at the end
of each parallel region is OpenMP's wait policy (prefer_short_spin, set when tuneforge is imported).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Mapping

from .errors import ConfigError

log = logging.getLogger("tuneforge")
CGROUP = Path("/sys/fs/cgroup")


def cgroup_quota(root: Path = CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in cores (e.g. 1.5), or None where there is none.
    Reads cgroup v2 `cpu.max` ("max 100000" = none), else v1 `cpu/cpu.cfs_quota_us` (-1 = none)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def affinity_cores() -> int:
    """The cores the scheduler lets this process run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def choose_threads(num_threads: int | None = None, env: Mapping[str, str] | None = None,
                   cores: int | None = None, quota: float | None = None) -> tuple[int, str]:
    """(thread count, why) for torch's intra-op pool.

    `num_threads`: the config key (None: not set); `env`: the environment (default os.environ);
    `cores`: cores in the affinity mask (default affinity_cores()); `quota`: the cgroup quota in
    cores (default cgroup_quota()). Raises ConfigError for an OMP_NUM_THREADS that is not a
    positive whole number (OpenMP would silently ignore it)."""
    if num_threads is not None:
        return int(num_threads), "num_threads key"
    env = os.environ if env is None else env
    raw = env.get("OMP_NUM_THREADS", "").strip()
    if raw:
        first = raw.split(",")[0].strip()  # OpenMP's nested list: the outer level is ours
        if not first.isdigit() or int(first) < 1:
            raise ConfigError(f"environment variable OMP_NUM_THREADS={raw!r} must be a positive whole number "
                              "(the CPU threads to train with); unset it to use every available core")
        return int(first), "OMP_NUM_THREADS"
    cores = affinity_cores() if cores is None else cores
    quota = cgroup_quota() if quota is None else quota
    if quota is not None and math.ceil(quota) < cores:
        return max(1, math.ceil(quota)), f"cgroup CPU quota of {quota:g} cores ({cores} cores in the affinity mask)"
    return max(1, cores), f"{cores} cores in this process's affinity mask"


def apply_threads(num_threads: int | None = None) -> tuple[int, str]:
    """Set torch's intra-op thread count from choose_threads, logging one line where that changes
    it; without the key, a lower count the program set itself is kept. Returns (count, why)."""
    import torch

    count, why = choose_threads(num_threads)
    before = torch.get_num_threads()
    if num_threads is None and before < count:  # the program's torch.set_num_threads, or torch's own cap: kept
        return before, f"torch's count before training, below the {count} of {why}"
    if count != before:
        torch.set_num_threads(count)
        log.info("cpu threads: %d (%s; torch's default was %d)", count, why, before)
    if count > 1 and "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        log.info("torch started before tuneforge, with OpenMP's default wait policy: beside another busy "
                 "process training can be several times slower; import tuneforge first, or export "
                 "GOMP_SPINCOUNT=%d OMP_WAIT_POLICY=passive", SPIN_COUNT)
    return count, why


_SET_BY_US = "_TUNEFORGE_WAIT_POLICY"  # marks the OMP_WAIT_POLICY / GOMP_SPINCOUNT that prefer_short_spin set
SPIN_COUNT = 3000  # GNU OpenMP counts about 100,000 spins per ms, so ~30 us (5x either way by CPU)


def prefer_short_spin(env: dict | None = None, torch_loaded: bool | None = None) -> bool:
    """Where the user set neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT and torch's OpenMP runtime has
    not started yet (it reads them once, when torch is imported): GOMP_SPINCOUNT=SPIN_COUNT, and
    OMP_WAIT_POLICY=PASSIVE for other OpenMP runtimes (LLVM's libomp: sleep at once). True where set.

    A thread that ends a parallel region first waits for its siblings; a training step opens tens
    of thousands of regions (benchmarks/parallel_regions.py). Measured with benchmarks/contention.py
    (issue 21, README "Beside other busy processes"):
    - GNU OpenMP's default (spin ~3 ms, torch's CPU build): beside another busy process the
      sibling is often descheduled and the waiter spins out its time slice: a LoRA step of the
      demo was 12-33x slower beside one busy loop;
    - passive (sleep at once, a futex): about as fast beside a busy loop as alone, but on an idle
      machine each region's wake-up goes through the kernel: 35-38 % slower on a 2-core VM;
    - a short spin (this): as fast as spinning when idle, and bounded beside a busy process."""
    import sys

    env = os.environ if env is None else env
    loaded = ("torch" in sys.modules) if torch_loaded is None else torch_loaded
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env or loaded:  # GOMP_SPINCOUNT overrides the policy
        return False
    env["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env[_SET_BY_US] = "1"
    return True


def wait_policy(env: Mapping[str, str] | None = None) -> str:
    """The OpenMP wait policy in effect, in words, for `tuneforge env`."""
    env = os.environ if env is None else env
    value = (env.get("OMP_WAIT_POLICY") or "").strip()
    if env.get("GOMP_SPINCOUNT"):
        why = "set by tuneforge" if env.get(_SET_BY_US) else "GOMP_SPINCOUNT"
        return f"spin {env['GOMP_SPINCOUNT']} times, then sleep ({why})"
    if value.lower() not in ("active", "passive"):  # OpenMP ignores any other value
        unread = f"; OMP_WAIT_POLICY={value!r} is neither active nor passive, so OpenMP ignores it" if value else ""
        return f"OpenMP's default (spin, then sleep: slow beside other busy processes{unread})"
    return f"{value.lower()} ({'set by tuneforge' if env.get(_SET_BY_US) else 'OMP_WAIT_POLICY'})"


# ---- during training: the cores other processes leave free --------------------------------------
def cpu_busy_seconds(cpus: set[int], stat: Path = Path("/proc/stat"), count_nice: bool | None = None) -> float | None:
    """CPU seconds spent busy on the CPUs `cpus`, from /proc/stat: user, system, interrupts and a
    VM's steal time (another VM holds the core); not idle or waiting for I/O, and not the `nice`
    column (processes at a lower priority yield to ours) unless this process runs niced itself
    (`count_nice` None: os.nice(0) > 0), where its own time is there. None where /proc/stat cannot
    be read or has no line for these CPUs (not Linux); malformed lines are skipped."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    if count_nice is None:
        count_nice = hasattr(os, "nice") and os.nice(0) > 0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy, seen = 0, False
    for line in lines:
        name, *fields = line.split() or [""]
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        try:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in (fields + ["0"] * 8)[:8])
        except ValueError:
            continue
        busy += user + system + irq + softirq + steal + (nice if count_nice else 0)
        seen = True
    return busy / tick if seen else None


class FreeCores:
    """Lowers torch's thread count while other processes keep this process's cores busy, and raises
    it back (at most to the count training started with) when they stop (issue 21).

    Why: an OpenMP thread that ends a parallel region waits for its siblings, and a training step
    opens tens of thousands of regions. Beside a busy process a sibling is often descheduled, so
    each wait can last a scheduler time slice; with one thread fewer nobody waits on the core the
    other process holds. Passive waiting avoids most of that but makes every region on an idle
    machine pay a wake-up through the kernel (35-38 % of the speed on a 2-core VM); a short spin
    (prefer_short_spin) and this together keep both (README "Beside other busy processes").

    `update()` after each optimizer step: over the time since the last measurement (at least
    `window` seconds; shorter steps add up), the other processes' use of our CPUs, in cores, is the
    CPUs' busy time (/proc/stat: `busy`) less this process's own (time.process_time: `own`), per
    second of `clock`; the thread count follows the cores left (`target`: at least 1, at most
    `threads`, the count training started with). Returns the new count where it changed, else
    None. `set_threads` (default torch.set_num_threads) applies it."""

    DOWN, UP = 0.6, 0.7  # in cores; see target()

    def __init__(self, threads: int, cpus: set[int] | None = None, window: float = 1.0,
                 busy=cpu_busy_seconds, clock=time.monotonic, own=time.process_time,
                 set_threads=None):
        self.threads = self.current = threads
        self.cpus = set(cpus) if cpus is not None else set(os.sched_getaffinity(0))
        self.window, self.busy, self.clock, self.own = window, busy, clock, own
        self.set_threads = set_threads or _torch_set_threads
        self.others = 0.0  # the other processes' use over the last window, in cores
        self._mark = self._read()

    @property
    def measurable(self) -> bool:
        """Whether the CPUs' busy time can be read (/proc/stat)."""
        return self._mark is not None

    def _read(self) -> tuple[float, float, float] | None:
        busy = self.busy(self.cpus)
        return None if busy is None else (self.clock(), busy, self.own())

    def update(self) -> int | None:
        if self._mark is None or self.clock() - self._mark[0] < self.window:  # /proc/stat is read once a window
            return None
        now = self._read()
        if now is None:
            return None
        wall = now[0] - self._mark[0]
        others = max(0.0, (now[1] - self._mark[1]) - (now[2] - self._mark[2])) / wall
        self._mark, self.others = now, others
        target = self.target(len(self.cpus) - others)
        if target == self.current:
            return None
        self.set_threads(target)
        before, self.current = self.current, target
        log.info("cpu threads: %d (was %d): other processes use %.2f of this process's %d cores",
                 target, before, others, len(self.cpus))
        return target

    def target(self, free: float) -> int:
        """The thread count for `free` cores (those other processes leave), with hysteresis so that a
        steady neighbour near a threshold does not flip it every window: one thread fewer while
        the others take more than DOWN of its core (free < current - DOWN), one more once they
        leave UP of the next one free (free >= current + UP); between 1 and `threads`."""
        count = self.current
        while count > 1 and free < count - self.DOWN:
            count -= 1
        while count < self.threads and free >= count + self.UP:
            count += 1
        return count

    def restore(self) -> None:
        """Back to the count training started with (after training: evaluation, saving, the next run)."""
        if self.current != self.threads:
            self.set_threads(self.threads)
            self.current = self.threads

    def __enter__(self) -> "FreeCores":
        return self

    def __exit__(self, *exc) -> None:  # restored also when training stops with an error
        self.restore()


def _torch_set_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def follow_free_cores(num_threads: int | None, processes: int = 1) -> FreeCores | None:
    """A FreeCores for this training run, or None where the count stays fixed: the `num_threads`
    key asks for exactly that many, one thread has nothing to lower, a multi-process run's ranks
    share the CPUs on purpose, and without /proc/stat nothing can be measured."""
    import torch

    threads = torch.get_num_threads()
    if num_threads is not None or threads < 2 or processes > 1:
        return None
    watch = FreeCores(threads)
    return watch if watch.measurable else None
