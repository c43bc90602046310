"""torch.distributed from the Slurm job's own variables: one Slurm task per GPU (or per CPU process here).

The `deepspeed` launcher would ssh to the other nodes, which clusters forbid; `torchrun` inside an sbatch
task would nest launchers. Slurm already starts one task per rank, so each task only needs RANK,
LOCAL_RANK, WORLD_SIZE and a rendezvous address, all derived from SLURM_* variables.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch


TIMEOUT_ENV = "LLAVA_HPC_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0

_cpu_group = None  # a gloo group beside an NCCL one, for small host-side agreements (None: the default group is fine)


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return nodelist.split(",")[0].split("[")[0]


def environment() -> DistributedEnv:
    """RANK/WORLD_SIZE if a launcher set them, else the Slurm task's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistributedEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                              env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
        job = int(env.get("SLURM_JOB_ID", "0"))
        # A port per job: two jobs sharing a node must not meet at the same rendezvous.
        return DistributedEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                              _first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")), 20000 + job % 20000)
    return DistributedEnv(0, 0, 1, "127.0.0.1", 29500 + os.getpid() % 1000)


def setup(env: DistributedEnv) -> torch.device:
    """Export the variables DeepSpeed and torch expect, pick the device, join the process group."""
    os.environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.world_size),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device = torch.device("cpu")
    if env.world_size > 1 and not torch.distributed.is_initialized():
        global _cpu_group
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=collective_timeout_s())
        torch.distributed.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
        if backend == "nccl":
            # The per-step flags (`any_rank`) travel on the CPU: a GPU collective would make the host wait for every
            # kernel queued so far, each step.
            _cpu_group = torch.distributed.new_group(backend="gloo", timeout=timeout)
    return device


def collective_timeout_s() -> float:
    """How long a rank waits in a collective (or for the others to join) before it fails: long enough for rank 0 to
    export a 13B model while the others wait at a barrier, short enough that a dead peer does not hold GPUs for
    hours (torch's default for gloo is 30 min)."""
    return float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """For each flag, whether any rank set it: one small all-reduce, and none at all in a single process. On NCCL it
    runs on the CPU group, so the host never waits for the GPU's queue to drain (it waits for the other ranks)."""
    if not torch.distributed.is_initialized():
        return flags
    tensor = torch.tensor([int(flag) for flag in flags], dtype=torch.int32)
    if _cpu_group is None and torch.distributed.get_backend() == "nccl":
        tensor = tensor.cuda()
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=_cpu_group)
    return tuple(bool(value) for value in tensor.tolist())


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar tensor over ranks, as a float (waits for the device: call it only where you log)."""
    if not torch.distributed.is_initialized():
        return float(value)
    tensor = value.detach().to(torch.float64).reshape(1)
    if torch.distributed.get_backend() == "nccl":
        tensor = tensor.cuda()
    torch.distributed.all_reduce(tensor)
    return tensor.item() / torch.distributed.get_world_size()


def failure_messages(failure: str | None) -> list[tuple[int, str]]:
    """(rank, message) of every rank that failed, in rank order. Collective; call it once `any_rank` said some rank
    failed, so messages travel only then."""
    if not torch.distributed.is_initialized():
        return [] if failure is None else [(0, failure)]
    gathered: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, failure)
    return [(rank, message) for rank, message in enumerate(gathered) if message is not None]


def all_reduce_mean_and_any(value: float, flag: bool) -> tuple[float, bool]:
    """The mean of `value` over ranks and whether `flag` is set on any rank."""
    (flag,) = any_rank(flag)
    return mean_over_ranks(torch.tensor(value, dtype=torch.float64)), flag


def gather_failures(failure: str | None) -> list[tuple[int, str]]:
    """(rank, message) of every rank that failed, in rank order; empty if none did. Collective: one small
    all-reduce in the usual case, messages only when something failed."""
    (failed,) = any_rank(failure is not None)
    return failure_messages(failure) if failed else []
