"""What Slurm says, and the doctor's Slurm rows.

Commands run as subprocesses with timeouts (`run_command`: a missing tool or a hang is a result, never a traceback);
`slurm_facts` asks `sinfo` and `sacctmgr` once per doctor run. From the stages a pipeline would queue as Slurm jobs,
the checks say whether Slurm answers, whether each job's account and QOS are the user's, and whether its partition
exists, is up, and has the nodes and GPUs (of the kind `cluster.gpu_types` says, with native bf16 where needed).
"""

from __future__ import annotations

import getpass
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from llava_hpc.config import Pipeline
from llava_hpc.doctor.result import CheckResult
from llava_hpc.rundir import RunDir
from llava_hpc.stages import ORDER, StageContext, get_stage

COMMAND_TIMEOUT_S = 20.0
# GPU kinds (GRES type names, lowercased prefixes) that have no native bf16: they would emulate it, slowly.
NO_BF16_GPUS = ("v100", "t4", "p100", "p40", "p4", "k80", "k40", "m40", "m60", "rtx2080", "rtx_2080", "2080ti",
                "titanv", "titan_v", "quadro_rtx")


# ---------------------------------------------------------------------------------------------- subprocesses
@dataclass
class CommandResult:
    returncode: int | None  # None: it did not run (not found, timed out)
    stdout: str = ""
    stderr: str = ""
    problem: str = ""  # why it did not run

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def why(self) -> str:
        if self.problem:
            return self.problem
        text = (self.stderr or self.stdout).strip().splitlines()
        return f"exit {self.returncode}: {text[-1] if text else 'no output'}"


def run_command(argv: list[str], timeout: float = COMMAND_TIMEOUT_S, env: dict | None = None) -> CommandResult:
    """Run a command; never raises for a missing tool or a hang (the tests replace this function)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError:
        return CommandResult(None, problem=f"{argv[0]} not found on PATH")
    except subprocess.TimeoutExpired:
        return CommandResult(None, problem=f"`{' '.join(argv[:3])}` did not answer within {timeout:.0f} s")
    except OSError as exc:
        return CommandResult(None, problem=f"{argv[0]} could not run: {exc.strerror or exc}")
    return CommandResult(done.returncode, done.stdout, done.stderr)


def current_user() -> str:
    try:
        return getpass.getuser()  # $LOGNAME/$USER, else the password database
    except Exception:  # noqa: BLE001 - no user name anywhere (a container with a bare uid)
        return str(os.getuid())


# ---------------------------------------------------------------------------------------------- what Slurm says
@dataclass
class Gres:
    name: str
    type: str | None
    count: int

    def __str__(self) -> str:
        return ":".join(x for x in (self.name, self.type, str(self.count)) if x)


def parse_gres(text: str) -> list[Gres]:
    """sinfo's %G: 'gpu:a40:4(S:0-1),mps:400', 'gpu:2', '(null)'."""
    items, depth, current = [], 0, ""
    for char in text.strip():
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    parsed = []
    for item in items:
        item = re.sub(r"\(.*\)$", "", item.strip())
        if not item or item == "(null)":
            continue
        parts = item.split(":")
        count = 1
        if len(parts) > 1 and re.fullmatch(r"\d+[KMG]?", parts[-1]):
            number = parts.pop()
            count = int(re.sub(r"[KMG]$", "", number)) * {"K": 1024, "M": 1024**2, "G": 1024**3}.get(number[-1], 1)
        parsed.append(Gres(parts[0], parts[1] if len(parts) > 1 else None, count))
    return parsed


@dataclass
class Partition:
    name: str
    available: str = "up"
    nodes: int = 0
    gres: list[Gres] = field(default_factory=list)
    gres_text: list[str] = field(default_factory=list)  # as sinfo shows it, one entry per node group

    def gpus(self) -> list[Gres]:
        return [g for g in self.gres if g.name == "gpu"]

    def max_gpus_per_node(self) -> int:
        return max((g.count for g in self.gpus()), default=0)


@dataclass
class Association:
    account: str
    partition: str  # '' = any
    qos: list[str]


@dataclass
class SlurmFacts:
    reachable: bool
    problem: str = ""  # why not reachable
    partitions: dict[str, Partition] = field(default_factory=dict)
    default_partition: str | None = None
    user: str = ""
    associations: list[Association] | None = None  # None: sacctmgr could not tell
    associations_problem: str = ""


def slurm_facts(run: Callable[..., CommandResult] | None = None, user: str | None = None) -> SlurmFacts:
    """One sinfo and one sacctmgr call."""
    run = run or run_command
    user = user or current_user()
    info = run(["sinfo", "-h", "-o", "%P|%a|%D|%G"])
    if not info.ok:
        return SlurmFacts(False, info.why(), user=user)
    facts = SlurmFacts(True, user=user)
    for line in info.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 4 or not parts[0]:
            continue
        name = parts[0].rstrip("*")
        if parts[0].endswith("*"):
            facts.default_partition = name
        partition = facts.partitions.setdefault(name, Partition(name, parts[1]))
        partition.nodes += int(parts[2]) if parts[2].isdigit() else 0
        partition.gres.extend(parse_gres(parts[3]))
        partition.gres_text.append(parts[3])
    assoc = run(["sacctmgr", "-nP", "show", "assoc", f"user={user}", "format=account,partition,qos"])
    if not assoc.ok:
        facts.associations_problem = assoc.why()
        return facts
    facts.associations = []
    for line in assoc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 3 and parts[0]:
            facts.associations.append(Association(parts[0], parts[1], [q for q in parts[2].split(",") if q]))
    return facts


# ---------------------------------------------------------------------------------------------- the pipeline's jobs
def planned_stages(pipeline: Pipeline) -> list[str]:
    """The stages `submit all` would queue as Slurm jobs, asked of each stage's declaration as the orchestrator asks
    it (its table, whether the pipeline gives it anything to do, whether it runs on the login side), done or not."""
    ctx = StageContext(pipeline, RunDir(pipeline.run_dir), executor="slurm", dry_run=True)
    planned = []
    for name in ORDER:
        stage = get_stage(name)
        if stage.settings(pipeline) is None or stage.not_applicable(ctx) is not None or stage.login_side(ctx):
            continue
        planned.append(name)
    return planned


def training_stage(pipeline: Pipeline) -> str | None:
    """The stage whose nodes and GPUs the probe asks for: stage 2 (the one that spans nodes), else stage 1."""
    for stage in ("stage2", "stage1"):
        if getattr(pipeline.stages, stage) is not None:
            return stage
    return "features" if pipeline.datasets else None


def _stages_text(stages: list[str]) -> str:
    return ", ".join(stages)


# ---------------------------------------------------------------------------------------------- Slurm checks
def check_slurm(pipeline: Pipeline, facts: SlurmFacts) -> list[CheckResult]:
    if not facts.reachable:
        return [CheckResult("slurm", "error", f"Slurm is not reachable: {facts.problem}",
                            "run this on the cluster's login node (after `module load slurm` where the site needs it), "
                            "or use executor = 'local' to run here")]
    names = [f"{n}*" if n == facts.default_partition else n for n in facts.partitions]
    return [CheckResult("slurm", "ok", f"sinfo answers: partitions {', '.join(names) or 'none'}")]


def check_account(pipeline: Pipeline, facts: SlurmFacts) -> list[CheckResult]:
    """The account (and QOS) each job names must be one of the user's associations (for that partition)."""
    if facts.associations is None:
        return [CheckResult("account", "warning", f"cannot list your associations: {facts.associations_problem}",
                            "check with `sacctmgr show assoc user=$USER format=account,partition,qos`")]
    if not facts.associations:
        return [CheckResult("account", "error", f"user {facts.user} has no Slurm association (no account to charge)",
                            "ask the cluster's admins for an account, then set [slurm] account")]
    accounts = sorted({a.account for a in facts.associations})
    wanted: dict[tuple, dict[str, list[str]]] = {}  # (account, qos) -> partition -> stages
    for stage in planned_stages(pipeline):
        resources = pipeline.resources(stage)
        partition = resources.partition or facts.default_partition or ""
        wanted.setdefault((resources.account, resources.qos), {}).setdefault(partition, []).append(stage)
    results = []
    for (account, qos), by_partition in wanted.items():
        stages = [s for group in by_partition.values() for s in group]
        if account is None:
            results.append(CheckResult(
                "account", "warning", f"no account set for {_stages_text(stages)}: sites that require one (most "
                f"university clusters) refuse the job; your accounts: {', '.join(accounts)}",
                f"set [slurm] account = \"{accounts[0]}\" in the pipeline or profile, or pass --account to submit"))
            continue
        problems, allowed = [], set()
        for partition, group in by_partition.items():
            matching = [a for a in facts.associations if a.account == account and a.partition in ("", partition)]
            if not matching:
                elsewhere = [a.partition for a in facts.associations if a.account == account]
                problems.append(f"account {account!r} is yours only for partition(s) {', '.join(elsewhere)}, not "
                                f"{partition} ({_stages_text(group)})" if elsewhere else
                                f"account {account!r} is not one of yours ({', '.join(accounts)})")
                continue
            qos_here = {q for a in matching for q in a.qos}
            allowed |= qos_here
            if qos is not None and qos_here and qos not in qos_here:
                problems.append(f"QOS {qos!r} is not allowed for account {account!r} on {partition} (allowed: "
                                f"{', '.join(sorted(qos_here))}; {_stages_text(group)})")
        if problems:
            is_qos = all(p.startswith("QOS") for p in problems)
            fix = (f"set [slurm] qos to one of: {', '.join(sorted(allowed))}, or remove it" if is_qos else
                   f"set [slurm] account to one of: {', '.join(accounts)} "
                   "(sacctmgr show assoc user=$USER format=account,partition,qos)")
            results.append(CheckResult("qos" if is_qos else "account", "error", "; ".join(dict.fromkeys(problems)),
                                       fix))
            continue
        shown = (f", QOS {qos}" if qos else
                 f", default QOS (allowed: {', '.join(sorted(allowed))})" if allowed else "")
        results.append(CheckResult("account", "ok", f"{account}{shown} for {_stages_text(stages)}"))
    return results


def _no_bf16_kind(gpu_type: str | None) -> bool:
    return bool(gpu_type) and gpu_type.lower().replace("-", "_").startswith(NO_BF16_GPUS)


def check_partitions(pipeline: Pipeline, facts: SlurmFacts) -> list[CheckResult]:
    """Every partition a job names exists, is up and has the nodes; GPU jobs' partitions have enough GPUs, of the kind
    `cluster.gpu_types` says, with native bf16 where a training stage asks for bf16."""
    used: dict[str, list[str]] = {}
    for stage in planned_stages(pipeline):
        partition = pipeline.resources(stage).partition or facts.default_partition
        if partition is None:
            continue
        used.setdefault(partition, []).append(stage)
    results = []
    known = ", ".join(facts.partitions) or "none"
    for name, stages in used.items():
        check = f"partition {name}"
        partition = facts.partitions.get(name)
        if partition is None:
            results.append(CheckResult(check, "error", f"partition {name!r} ({_stages_text(stages)}) does not exist or "
                                       f"is not available to you; partitions: {known}",
                                       "set partition in [slurm] / [stages.<stage>.slurm] to one `sinfo -s` lists"))
            continue
        too_many = [s for s in stages if pipeline.resources(s).nodes > partition.nodes]
        gres = ", ".join(dict.fromkeys(partition.gres_text)) or "(null)"
        if partition.available != "up":
            results.append(CheckResult(check, "warning", f"partition {name} is {partition.available} "
                                       f"({_stages_text(stages)})", "jobs queue until the admins bring it up; "
                                       "`sinfo -p " + name + "` tells more"))
        elif too_many:
            nodes = max(pipeline.resources(s).nodes for s in too_many)
            results.append(CheckResult(check, "error", f"{_stages_text(too_many)} ask for {nodes} nodes; {name} has "
                                       f"{partition.nodes}", f"set nodes <= {partition.nodes} for "
                                       f"{_stages_text(too_many)}"))
        else:
            results.append(CheckResult(check, "ok", f"up, {partition.nodes} node(s), GRES {gres}; for "
                                       f"{_stages_text(stages)}"))
        gpu_stages = [s for s in stages if pipeline.resources(s).gpus > 0]
        if gpu_stages:
            results.append(_gpu_row(pipeline, partition, gpu_stages))
    return results


def _gpu_row(pipeline: Pipeline, partition: Partition, stages: list[str]) -> CheckResult:
    name = partition.name
    check = f"gpus {name}"
    wanted = max(pipeline.resources(s).gpus for s in stages)
    gpus = partition.gpus()
    shown = ", ".join(str(g) for g in gpus) or "(null)"
    if not gpus:
        return CheckResult(check, "error", f"{name} has no GPUs (GRES {shown}) but {_stages_text(stages)} ask for "
                           f"{wanted} per node", "use a GPU partition for them, or gpus = 0 for CPU work")
    if wanted > partition.max_gpus_per_node():
        return CheckResult(check, "error", f"{_stages_text(stages)} ask for {wanted} GPUs per node; {name}'s nodes "
                           f"have at most {partition.max_gpus_per_node()} ({shown})",
                           f"set gpus <= {partition.max_gpus_per_node()} (and more nodes if you need more GPUs)")
    expected = pipeline.cluster.gpu_types.get(name)
    types = [g.type for g in gpus if g.type]
    if expected is not None and expected.lower() not in {t.lower() for t in types}:
        reported = ", ".join(dict.fromkeys(types)) or "no type"
        return CheckResult(check, "error", f"{name} reports {shown} ({reported}), but cluster.gpu_types says "
                           f"{expected!r}", f"set cluster.gpu_types.{name} to what `sinfo -p {name} -h -o %G` shows, or "
                           f"use the partition that has {expected} GPUs")
    kind = expected or (types[0] if len(set(types)) == 1 else None)
    bf16 = [s for s in stages if s in ("stage1", "stage2") and getattr(pipeline.stages, s).precision == "bf16"]
    if kind and _no_bf16_kind(kind) and bf16:
        return CheckResult(check, "error", f"{kind} GPUs have no native bf16, but {_stages_text(bf16)} set "
                           f"precision = 'bf16'", "set precision = \"fp16\" (loss scaling) or \"auto\" for them")
    note = (f"{expected} as cluster.gpu_types says" if expected else
            "kind not checked: no cluster.gpu_types entry for it")
    return CheckResult(check, "ok", f"{shown} ({note}); {_stages_text(stages)} ask for {wanted} per node")
