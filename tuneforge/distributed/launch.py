"""`tuneforge train` restarts itself under torchrun (torch.distributed.run), as LLaMA-Factory's
`llamafactory-cli train` does (its launcher.py): when FORCE_TORCHRUN is set to a true value, or when
more than one accelerator device is visible and this process was not started by a launcher already.

The environment names and defaults are LLaMA-Factory's: NNODES (1), NODE_RANK (0), NPROC_PER_NODE
(the number of visible devices, 1 on a CPU-only machine), MASTER_ADDR (127.0.0.1), MASTER_PORT (a
free port on this machine). torchrun then sets RANK / LOCAL_RANK / WORLD_SIZE for every process, and
accelerate reads them (gloo on CPUs, nccl on CUDA devices)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

from ..errors import ConfigError

log = logging.getLogger("tuneforge")
LAUNCHED = ("LOCAL_RANK", "WORLD_SIZE")  # set by torchrun / accelerate launch for every process


def _enabled(name: str, env) -> bool:
    return str(env.get(name, "0")).strip().lower() in ("1", "true", "y", "yes")


def device_count() -> int:
    """Visible accelerator devices (CUDA, XPU, ...); 0 on a CPU-only machine."""
    import torch

    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "device_count"):
        return int(probe.device_count())
    return torch.cuda.device_count()


def under_launcher(env=None) -> bool:
    """This process was started by torchrun, `accelerate launch` or another launcher."""
    env = os.environ if env is None else env
    return any(name in env for name in LAUNCHED)


def info_on_rank_zero(env=None) -> bool:
    """In a launched process other than rank 0 (RANK, set by torchrun and `accelerate launch`, is
    not 0): tuneforge's info lines are left to rank 0, which prints the same ones (every process
    reads the same config, data and model); warnings and errors still print in every process.
    Returns whether this process's info lines were turned off (the "tuneforge" logger, and the
    "tuneforge.*" ones under it, at WARNING)."""
    env = os.environ if env is None else env
    if str(env.get("RANK", "0")).strip() in ("", "0"):
        return False
    logging.getLogger("tuneforge").setLevel(logging.WARNING)
    return True


def needs_torchrun(env=None, devices: int | None = None) -> bool:
    """FORCE_TORCHRUN is true, or several devices are visible; never inside a launched process."""
    env = os.environ if env is None else env
    if under_launcher(env):
        return False
    if _enabled("FORCE_TORCHRUN", env):
        return True
    return (device_count() if devices is None else devices) > 1


def free_port() -> int:
    """A TCP port free on this machine now (the kernel's pick), for MASTER_PORT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count(env, name: str, default: int, lowest: int) -> int:
    text = str(env.get(name, default)).strip()
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} must be an integer (torchrun's "
                          f"{name.lower()}); unset it for {default}") from None
    if value < lowest:
        raise ConfigError(f"environment variable {name}={value} must be at least {lowest}; unset it for {default}")
    return value


def torchrun_command(argv: list[str], env=None, devices: int | None = None) -> list[str]:
    """The torchrun command line that runs `tuneforge <argv>` in every process: NNODES, NODE_RANK,
    NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT read from `env` with LLaMA-Factory's defaults.

    Raises ConfigError for a value that is not a number or out of range."""
    env = os.environ if env is None else env
    nnodes = _count(env, "NNODES", 1, 1)
    node_rank = _count(env, "NODE_RANK", 0, 0)
    if node_rank >= nnodes:
        raise ConfigError(f"environment variable NODE_RANK={node_rank} must be below NNODES={nnodes}")
    visible = device_count() if devices is None else devices
    nproc = _count(env, "NPROC_PER_NODE", max(visible, 1), 1)
    addr = env.get("MASTER_ADDR") or "127.0.0.1"
    port = _count(env, "MASTER_PORT", free_port(), 1)
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank",
            str(node_rank), "--nproc_per_node", str(nproc), "--master_addr", addr, "--master_port",
            str(port), "-m", "tuneforge", *argv]


USER_ERROR_FILE = "TUNEFORGE_USER_ERROR_FILE"  # where a launched process notes that it stopped on bad input


def note_user_error(same_everywhere: bool, env=None) -> bool:
    """In a process that relaunch started: note in the launcher's file that this process stopped
    on bad input (exit 2), so the launcher exits 2 as well. Returns whether this process should
    print the error line itself: for an error every rank meets alike (`same_everywhere`: the
    config, the data) only rank 0 does; any other error each rank prints."""
    env = os.environ if env is None else env
    path = env.get(USER_ERROR_FILE)
    if path:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{env.get('RANK', '?')}\n")
        except OSError:
            pass
    return not same_everywhere or str(env.get("RANK", "0")) == "0"


def relaunch(argv: list[str]) -> int:
    """Run `tuneforge <argv>` under torchrun and return its exit code: 2 when a process stopped on
    bad input (a config, data or checkpoint error: its one line printed by rank 0), else torchrun's
    (the first failing process's). Every process reads the same config again."""
    import tempfile

    command = torchrun_command(argv)
    nproc, nnodes = command[command.index("--nproc_per_node") + 1], command[command.index("--nnodes") + 1]
    log.info("starting %s processes per node on %s node(s) under torchrun (master %s:%s)", nproc, nnodes,
             command[command.index("--master_addr") + 1], command[command.index("--master_port") + 1])
    with tempfile.TemporaryDirectory(prefix="tuneforge-launch-") as folder:
        marker = os.path.join(folder, "user_error")
        env = {**os.environ, USER_ERROR_FILE: marker}
        code = subprocess.run(command, check=False, env=env).returncode  # its processes have LOCAL_RANK
        if code != 0 and os.path.exists(marker):
            print("tuneforge: error: the run stopped on the input error above (every process reads the "
                  "same config); fix it and run the same command again", file=sys.stderr)
            return 2
    return code
