"""How many CPU threads torch uses, and why (issue 21).

torch's own default is the machine's core count as OpenMP sees it, which ignores a cgroup CPU
quota (a container limited to 1.5 CPUs on a 16-core host gets 16 threads). Here the count is,
first match wins:
1. the `num_threads` config key;
2. OMP_NUM_THREADS, as torch and OpenMP read it;
3. the cores this process may run on: os.sched_getaffinity, capped by a cgroup v2 quota
   (`cpu.max`: "quota period", rounded up) or a cgroup v1 one (cpu.cfs_quota_us / cpu.cfs_period_us).
"""

from __future__ import annotations

import logging
import math
import os
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
    if num_threads is None and before < count:  # the program lowered it (torch.set_num_threads): kept
        return before, f"torch.set_num_threads({before}) before training (below {count}: {why})"
    if count != before:
        torch.set_num_threads(count)
        log.info("cpu threads: %d (%s; torch's default was %d)", count, why, before)
    if count > 1 and "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        log.info("torch started before tuneforge, with OpenMP's default wait policy: beside another busy "
                 "process training can be several times slower; export OMP_WAIT_POLICY=passive to avoid it")
    return count, why


_SET_BY_US = "_TUNEFORGE_WAIT_POLICY"  # marks an OMP_WAIT_POLICY that prefer_passive_wait set


def prefer_passive_wait(env: dict | None = None, torch_loaded: bool | None = None) -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE where the user set neither it nor GOMP_SPINCOUNT and torch's OpenMP runtime has not
    started yet (it reads the variable once, when torch is imported). True where it was set.

    Why (benchmarks/contention.py, issue 21): with GNU OpenMP's default, a thread that reaches
    the end of a parallel region first spins for its sibling; beside another busy process the
    sibling is often descheduled, and a training step has ~60,000 regions, so a LoRA step of the
    demo went from 2.3 s to 28 s (12x, 4x the CPU seconds) beside one busy loop; passive
    threads sleep at once (a futex) and the step took about as long as alone."""
    import sys

    env = os.environ if env is None else env
    loaded = ("torch" in sys.modules) if torch_loaded is None else torch_loaded
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env or loaded:  # GOMP_SPINCOUNT overrides the policy
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env[_SET_BY_US] = "1"
    return True


def wait_policy(env: Mapping[str, str] | None = None) -> str:
    """The OpenMP wait policy in effect, in words, for `tuneforge env`."""
    env = os.environ if env is None else env
    value = env.get("OMP_WAIT_POLICY")
    if env.get("GOMP_SPINCOUNT"):
        return f"spin {env['GOMP_SPINCOUNT']} times, then sleep (GOMP_SPINCOUNT)"
    if value is None:
        return "OpenMP's default (spin, then sleep: slow beside other busy processes)"
    return f"{value.lower()} ({'set by tuneforge' if env.get(_SET_BY_US) else 'OMP_WAIT_POLICY'})"
