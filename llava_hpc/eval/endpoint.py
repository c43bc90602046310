"""Where the judge can talk to its endpoint from, and how a judge job gets its API key.

Compute nodes of most university clusters have no internet: they reach the cluster's own addresses (another
node serving vLLM, say) but not api.openai.com. The login side reaches both. So on Slurm the judge runs as a job
only when that job can finish the work: a sync transport to an endpoint its nodes reach. Everything else is judged
from the login side with `llava-hpc judge` (the Batch API there submits and returns at once; `--collect` fetches the
results), so no job ever needs the internet or holds an allocation while OpenAI works through a batch.

The key: Slurm stores a job's environment with the job (controller state; `sacct --env-vars` where the site
records it), so llava-hpc never lets sbatch export it. A judge job reads the key from its own environment if the
site puts it there, else from a private file the user keeps (`judge.api_key_file`, default
~/.config/llava-hpc/<api_key_env>, mode 0600), the way ~/.netrc and ~/.ssh keys live on shared home directories.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from llava_hpc.config import Pipeline

OPENAI_URL = "https://api.openai.com/v1"


def endpoint_scope(base_url: str | None) -> str:
    """'cluster': a private address compute nodes can reach; 'login': this machine's loopback (a node's loopback
    is the node itself); 'internet': anything else (the OpenAI API, public hosts, names that do not resolve here)."""
    host = urlparse(base_url or OPENAI_URL).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return "internet"
    parsed = [ipaddress.ip_address(a.split("%")[0]) for a in addresses]
    if parsed and all(a.is_loopback for a in parsed):
        return "login"
    if parsed and all(a.is_private and not a.is_loopback and not a.is_link_local for a in parsed):
        return "cluster"
    return "internet"


@dataclass(frozen=True)
class Placement:
    as_job: bool
    reason: str  # why, and for the login side what to run


def judge_placement(pipeline: Pipeline) -> Placement:
    """Whether the judge stage is submitted as a Slurm job, or judged from the login side."""
    config = pipeline.judge
    url = config.base_url or OPENAI_URL
    if config.transport == "batch":
        return Placement(False, "the Batch API is driven from the login side: once generate is done, "
                                "`llava-hpc judge` submits the batches and returns; `llava-hpc judge --collect` "
                                "fetches the reviews and writes the report")
    if config.where == "login":
        return Placement(False, "judge.where = 'login': once generate is done, run `llava-hpc judge` here")
    partition = pipeline.resources("judge").partition
    if config.where == "job":
        return Placement(True, "judge.where = 'job'")
    scope = endpoint_scope(config.base_url)
    if scope == "cluster":
        return Placement(True, f"compute nodes reach {url} (a cluster address)")
    if scope == "internet" and partition in pipeline.cluster.internet_partitions:
        return Placement(True, f"partition {partition} reaches the internet (cluster.internet_partitions)")
    where = "is this machine's loopback" if scope == "login" else "needs the internet, which compute nodes lack"
    return Placement(False, f"{url} {where}: once generate is done, run `llava-hpc judge` here (or set "
                            "cluster.internet_partitions / judge.where = 'job' if your nodes reach it)")


def needs_key(pipeline: Pipeline) -> bool:
    """The OpenAI API always does; a local server (base_url) only if a key is set up for it."""
    config = pipeline.judge
    return not config.base_url or bool(os.environ.get(config.api_key_env)) or config.key_file().exists()


def key_file_problem(path: Path) -> str | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return f"{path} does not exist"
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{path} is readable by others (mode {stat.filemode(info.st_mode)}): chmod 600 {path}"
    if not path.read_text().strip():
        return f"{path} is empty"
    return None


def job_key_problem(pipeline: Pipeline) -> str | None:
    """At submit time, for a judge job: why the job would have no key, with how to give it one; None if fine."""
    if not needs_key(pipeline):
        return None
    config = pipeline.judge
    path = config.key_file()
    problem = key_file_problem(path)
    if problem is None:
        return None
    return (f"the judge job needs ${config.api_key_env} and llava-hpc never passes it to sbatch (Slurm stores a job's "
            f"environment): {problem}. Create it once with\n"
            f"    install -D -m 600 /dev/null {path} && printf %s \"${config.api_key_env}\" > {path}\n"
            f"or judge from the login side (judge.where = 'login', then `llava-hpc judge`)")


def key_from_file(pipeline: Pipeline) -> str | None:
    path = pipeline.judge.key_file()
    if key_file_problem(path) is not None:
        return None
    return path.read_text().strip()
