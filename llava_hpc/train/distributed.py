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
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                             timeout=datetime.timedelta(seconds=collective_timeout_s()))
    return device


def collective_timeout_s() -> float:
    """How long a rank waits in a collective (or for the others to join) before it fails: long enough for rank 0 to
    export a 13B model while the others wait at a barrier, short enough that a dead peer does not hold GPUs for
    hours (torch's default for gloo is 30 min)."""
    return float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _tensor(values: list[float], dtype=torch.float64) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=dtype)
    return tensor.cuda() if torch.distributed.get_backend() == "nccl" else tensor


def all_reduce_mean_and_any(value: float, flag: bool) -> tuple[float, bool]:
    """The mean of `value` over ranks and whether `flag` is set on any rank, in one all-reduce."""
    if not torch.distributed.is_initialized():
        return value, flag
    tensor = _tensor([value, float(flag)])
    torch.distributed.all_reduce(tensor)
    return tensor[0].item() / torch.distributed.get_world_size(), tensor[1].item() > 0


def gather_failures(failure: str | None) -> list[tuple[int, str]]:
    """(rank, message) of every rank that failed, in rank order; empty if none did. Collective. The usual case costs
    one one-element all-reduce; messages travel only when something failed."""
    if not torch.distributed.is_initialized():
        return [] if failure is None else [(0, failure)]
    flag = _tensor([0 if failure is None else 1], dtype=torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() == 0:
        return []
    gathered: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, failure)
    return [(rank, message) for rank, message in enumerate(gathered) if message is not None]
