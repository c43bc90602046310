"""`llava-hpc doctor`: what a first submit would trip over, checked from the login node and reported as rows.

Each check takes the loaded pipeline (and what Slurm said, asked once) and returns `CheckResult`s: a name, a status
(`ok`, `warning`, `error`, `skipped`), what was found, and how to fix it. Nothing here submits a stage or writes
into the run directory, except `--probe`, which queues one short job (about a minute, `PROBE_TIMEOUT_S` at most) on
the training stage's partition and nodes: on each node it reports CUDA and native bf16, writes a marker into the run
directory (the proof that compute nodes see and can write it), and joins a gloo all-reduce across the nodes.

Slurm's tools run as subprocesses with timeouts; a missing tool is a row, never a traceback. The module imports
nothing heavy at import time (torch, transformers, huggingface_hub, openai are imported by the checks that need them),
so `llava-hpc --help` stays fast.
"""

from __future__ import annotations

import getpass
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llava_hpc.config import Pipeline
from llava_hpc.secrets import without_secrets
from llava_hpc.stages.judge import JUDGED_KINDS

STATUSES = ("ok", "warning", "error", "skipped")
COMMAND_TIMEOUT_S = 20.0
SAMPLE_RECORDS = 100
PROBE_TIMEOUT_S = 180.0
PROBE_TIME_LIMIT_MIN = 3
# The features stage stores fp16 patch features once per unique image, zstd-compressed Parquet: ~0.92 x raw for
# random-normal values (docs/performance.md: 224 px CLIP-L 256 x 1024 = 471 KiB, 336 px 576 x 1024 = 1,059 KiB).
FEATURE_COMPRESSION = 0.92
HEADROOM = 1.25  # less free space than this many times the features: checkpoints, models and logs need room too
# Filesystems every node of a cluster mounts (by their /proc/mounts or `stat -f -c %T` names).
SHARED_FS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "fuse.beegfs", "ceph", "cephfs", "fuse.ceph", "fuse.cephfs",
             "glusterfs", "fuse.glusterfs", "panfs", "wekafs", "cifs", "smb3", "smbfs", "smb2", "afs", "orangefs",
             "pvfs2", "vast", "fuse.sshfs", "9p", "virtiofs", "nfsd"}
RAM_FS = {"tmpfs", "ramfs", "devtmpfs"}
NODE_LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/local", "/scratch/local", "/localscratch", "/lscratch")
# GPU kinds (GRES type names, lowercased prefixes) that have no native bf16: they would emulate it, slowly.
NO_BF16_GPUS = ("v100", "t4", "p100", "p40", "p4", "k80", "k40", "m40", "m60", "rtx2080", "rtx_2080", "2080ti",
                "titanv", "titan_v", "quadro_rtx")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
             "PREEMPTED", "REVOKED"}


@dataclass
class CheckResult:
    name: str
    status: str  # ok | warning | error | skipped
    detail: str = ""
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


def has_errors(results: list[CheckResult]) -> bool:
    return any(r.status == "error" for r in results)


def as_dicts(results: list[CheckResult]) -> list[dict]:
    return [asdict(r) for r in results]


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
def judged_benches(pipeline: Pipeline) -> list[str]:
    return [name for name in pipeline.generate_benches() if pipeline.benches[name].kind in JUDGED_KINDS]


def planned_stages(pipeline: Pipeline) -> list[str]:
    """The stages `submit all` would queue as Slurm jobs."""
    stages = []
    if pipeline.datasets and (pipeline.stages.stage1 or pipeline.stages.stage2):
        stages.append("features")
    stages += [s for s in ("stage1", "stage2") if getattr(pipeline.stages, s) is not None]
    if pipeline.benches:
        stages.append("generate")
        if judged_benches(pipeline):
            from llava_hpc.eval.endpoint import judge_placement

            if judge_placement(pipeline).as_job:
                stages.append("judge")
        stages.append("report")
    return stages


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


# ---------------------------------------------------------------------------------------------- run directory
def nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def filesystem_type(path: Path, run: Callable[..., CommandResult] | None = None) -> str | None:
    """The type of the filesystem holding `path`: the longest mount point in /proc/mounts, else `stat -f -c %T`."""
    real = os.path.realpath(nearest_existing(path))
    try:
        best, kind = "", None
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mount = parts[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            inside = real == mount or real.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, parts[2]
        if kind:
            return kind
    except OSError:
        pass
    out = (run or run_command)(["stat", "-f", "-c", "%T", real])
    return (out.stdout.strip() or None) if out.ok else None


def free_bytes(path: Path) -> int:
    info = os.statvfs(nearest_existing(path))
    return info.f_bavail * info.f_frsize


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_run_dir(pipeline: Pipeline, run: Callable[..., CommandResult] | None = None) -> list[CheckResult]:
    """Writable here; on a filesystem compute nodes share (a guess from its type and path, proved by --probe); room
    for the planned features."""
    root = Path(pipeline.run_dir)
    unset = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", str(root))
    if unset:
        return [CheckResult("run dir", "error", f"run_dir {root} names {', '.join('$' + v for v in unset)}, which is "
                            "not set", f"export {unset[0]}=... (a folder on a shared filesystem), or pass --run-dir"),
                CheckResult("filesystem", "skipped", "run_dir is not resolved"),
                CheckResult("disk space", "skipped", "run_dir is not resolved")]
    existing = nearest_existing(root)
    where = str(root) if existing == root else f"{root} (not created yet; {existing} exists)"
    if not os.access(existing, os.W_OK | os.X_OK):
        writable = CheckResult("run dir", "error", f"{where} is not writable by you",
                               "point run_dir (or --run-dir) at a folder you can write on a shared filesystem")
    else:
        writable = CheckResult("run dir", "ok", f"{where} is writable here")
    kind = filesystem_type(root, run)
    real = os.path.realpath(existing)
    local_dir = next((d for d in NODE_LOCAL_DIRS if real == d or real.startswith(d + "/")), None)
    fix = ("put run_dir on a filesystem every node mounts (/scratch, /home, a project space; not /tmp); "
           "`llava-hpc doctor --probe` proves compute nodes can write it")
    if pipeline.executor != "slurm":
        fs = CheckResult("filesystem", "ok", f"{kind or 'unknown'}; executor = '{pipeline.executor}': jobs run on "
                         "this machine")
    elif kind in RAM_FS:
        fs = CheckResult("filesystem", "warning", f"{root} is on {kind} (this machine's memory): compute nodes do "
                         "not see it", fix)
    elif kind and kind.lower() in SHARED_FS:
        fs = CheckResult("filesystem", "ok", f"{kind}: a shared filesystem")
    elif local_dir:
        fs = CheckResult("filesystem", "warning", f"{root} is under {local_dir} ({kind or 'unknown'}): node-local on "
                         "most clusters, so compute nodes would write their own copy", fix)
    else:
        fs = CheckResult("filesystem", "warning", f"{kind or 'unknown type'}: a local filesystem type; compute nodes "
                         "see it only if it is exported to them", fix)
    return [writable, fs, check_disk_space(pipeline)]


# ---------------------------------------------------------------------------------------------- planned features
_record_cache: dict[tuple, list] = {}


def dataset_records(path: Path, name: str | None = None) -> list:
    """The records of a llava-json file, parsed once per doctor run (space and data checks share them)."""
    from llava_hpc.data.llava_json import read_records

    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _record_cache:
        _record_cache.clear()  # one big file at a time is enough
        _record_cache[key] = read_records(path, name)
    return _record_cache[key]


def _vision_config(name: str) -> dict | None:
    """The vision tower's config.json (local directory or the local HF cache), without transformers."""
    path = Path(name).expanduser()
    candidates = [path / "config.json"] if path.is_absolute() or name.startswith(".") else []
    if not candidates:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            if isinstance(cached, str):
                candidates.append(Path(cached))
        except Exception:  # noqa: BLE001 - an id the hub library cannot parse: fall back to the name
            pass
    for candidate in candidates:
        try:
            config = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        return config.get("vision_config", config)
    return None


def feature_shape(pipeline: Pipeline) -> tuple[int, int]:
    """(patches, hidden) the features stage stores per image (CLS dropped, as the tower does)."""
    model = pipeline.model
    if model.vision_tower == "tiny":
        return (model.tiny_vision.image_size // model.tiny_vision.patch_size) ** 2, model.tiny_vision.hidden_size
    config = _vision_config(model.vision_tower) or {}
    image = config.get("image_size") or (336 if "336" in model.vision_tower else 224)
    patch = config.get("patch_size") or 14
    return (image // patch) ** 2, config.get("hidden_size") or 1024


def feature_bytes_per_image(pipeline: Pipeline) -> int:
    patches, hidden = feature_shape(pipeline)
    return int(patches * hidden * 2 * FEATURE_COMPRESSION)


def planned_images(pipeline: Pipeline, name: str) -> int | None:
    """Unique images the features stage would encode for a dataset (None: its file cannot be read)."""
    dataset = pipeline.datasets[name]
    if dataset.kind == "synthetic":
        total = pipeline.synthetic.n_pretrain if dataset.split == "pretrain" else pipeline.synthetic.n_instruct
        return min(total, dataset.max_samples or total)
    try:
        records = dataset_records(dataset.path, name)
    except (OSError, ValueError):
        return None
    images = {r["image"] for r in records if isinstance(r, dict) and isinstance(r.get("image"), str)}
    if dataset.max_samples and dataset.max_samples < len(records):
        return round(len(images) * dataset.max_samples / len(records))
    return len(images)


def _existing_feature_bytes(pipeline: Pipeline, name: str) -> int:
    folder = Path(pipeline.run_dir) / "features" / name
    return sum(p.stat().st_size for p in folder.glob("part-*.parquet")) if folder.is_dir() else 0


def check_disk_space(pipeline: Pipeline) -> CheckResult:
    names = pipeline.feature_datasets() if "features" in planned_stages(pipeline) else []
    per_image = feature_bytes_per_image(pipeline)
    patches, hidden = feature_shape(pipeline)
    needed, parts, unknown = 0, [], []
    for name in names:
        images = planned_images(pipeline, name)
        if images is None:
            unknown.append(name)
            continue
        needed += max(0, images * per_image - _existing_feature_bytes(pipeline, name))
        parts.append(f"{name} {images:,}")
    try:
        free = free_bytes(pipeline.run_dir)
    except OSError as exc:
        return CheckResult("disk space", "warning", f"cannot tell the free space of {pipeline.run_dir}: {exc}")
    plan = (f"features ~{_size(needed)} ({' + '.join(parts)} images x {_size(per_image)}, {patches}x{hidden} fp16)"
            if parts else "no features planned")
    also = f"; {', '.join(unknown)} not counted (file unreadable: see its data row)" if unknown else ""
    detail = f"{plan}; {_size(free)} free{also} (quotas are not seen here: check your site's quota tool)"
    fix = ("free space or point run_dir at a bigger filesystem (/scratch), or lower the datasets' max_samples")
    if unknown and not parts:
        return CheckResult("disk space", "skipped", f"{_size(free)} free; the features are not estimated: "
                           f"{', '.join(unknown)} cannot be read (see the data rows)")
    if free < needed:
        return CheckResult("disk space", "error", detail, fix)
    if free < needed * HEADROOM:
        return CheckResult("disk space", "warning", detail + f"; less than {HEADROOM - 1:.0%} left over for "
                           "checkpoints, models and logs", fix)
    return CheckResult("disk space", "warning" if unknown else "ok", detail)


# ---------------------------------------------------------------------------------------------- models
def _model_dir(name: str) -> Path | None:
    path = Path(name).expanduser()
    if path.is_absolute() or name.startswith("."):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - missing_models reported it already
        return None


def check_models(pipeline: Pipeline) -> list[CheckResult]:
    """The vision tower, the LLM and its tokenizer resolve from local paths or the local HF cache (jobs are offline)."""
    model = pipeline.model
    names = [model.vision_tower, model.llm]
    if all(n == "tiny" for n in names):
        return [CheckResult("models", "ok", "tiny vision tower and LLM (built here; nothing to fetch)")]
    from llava_hpc.model.builders import SMOLLM2, TINY, missing_models

    problems = missing_models(names)
    results = [CheckResult("models", "error", problem.split(": run `")[0], _fix_of(problem)) for problem in problems]
    if not problems:
        for role, name, files in (("vision tower", model.vision_tower, ("preprocessor_config.json",)),
                                  ("tokenizer", model.llm, TOKENIZER_FILES)):
            if name in (TINY, SMOLLM2):
                continue
            folder = _model_dir(name)
            if folder is not None and not any((folder / f).is_file() for f in files):
                what = "image processor" if role == "vision tower" else "tokenizer"
                results.append(CheckResult("models", "error", f"{name}: no {what} files ({', '.join(files)}) in {folder}",
                                           f"hf download {name} (the whole repository, not only the weights)"))
        if len(results) == 0:
            results.append(CheckResult("models", "ok", f"{', '.join(dict.fromkeys(names))} resolve offline "
                                       "(models and tokenizer)"))
    return results


def _fix_of(problem: str) -> str:
    """The command inside one of missing_models' messages."""
    found = re.search(r"(hf download [^`)]+|pip install [^`)]+)", problem)
    return f"{found.group(1).strip()} (on the login node)" if found else "fetch the model on the login node"


# ---------------------------------------------------------------------------------------------- data
def _used_datasets(pipeline: Pipeline) -> list[str]:
    names = list(pipeline.feature_datasets()) if (pipeline.stages.stage1 or pipeline.stages.stage2) else []
    names += [s.dataset for s in (pipeline.stages.stage1, pipeline.stages.stage2) if s is not None]
    return list(dict.fromkeys(names)) or list(pipeline.datasets)


def check_data(pipeline: Pipeline, sample: int = SAMPLE_RECORDS) -> list[CheckResult]:
    """Each dataset file exists and parses; a seeded sample of its records passes the template rules and names an
    image that exists."""
    results = []
    stage1 = pipeline.stages.stage1.dataset if pipeline.stages.stage1 else None
    for name in _used_datasets(pipeline):
        results.append(check_dataset(pipeline, name, sample, plain_pair=name == stage1))
    return results


def check_dataset(pipeline: Pipeline, name: str, sample: int = SAMPLE_RECORDS, plain_pair: bool = False
                  ) -> CheckResult:
    from llava_hpc.data.templates import RecordError, normalize_record

    dataset = pipeline.datasets[name]
    check = f"data {name}"
    if dataset.kind == "synthetic":
        return CheckResult(check, "ok", f"synthetic {dataset.split} split ({planned_images(pipeline, name):,} "
                           "records, generated in the job)")
    path, images = Path(dataset.path), Path(dataset.images)
    if not path.is_file():
        return CheckResult(check, "error", f"{path} does not exist",
                           f"fix datasets.{name}.path (or the variable it names), or copy the file there")
    try:
        records = dataset_records(path, name)
    except (OSError, ValueError) as exc:
        return CheckResult(check, "error", str(exc), "repair or re-download the file")
    if not images.is_dir():
        return CheckResult(check, "error", f"{len(records):,} records, but the image folder {images} does not exist",
                           f"fix datasets.{name}.images")
    if not records:
        return CheckResult(check, "error", f"{path} holds no records", "point the dataset at the right file")
    positions = sorted(random.Random(0).sample(range(len(records)), min(sample, len(records))))
    bad: list[str] = []
    for position in positions:
        record = records[position]
        try:
            normalize_record(record, position, plain_pair=plain_pair)
        except RecordError as exc:
            bad.append(f"record #{position} (id {exc.record_id!r}), field {exc.field}: {exc.problem}")
            continue
        if "id" not in record:
            bad.append(f"record #{position}, field id: missing (every record needs an id)")
        elif isinstance(record.get("image"), str) and not (images / record["image"]).is_file():
            bad.append(f"record #{position} (id {str(record['id'])!r}), field image: {images / record['image']} "
                       "does not exist")
    summary = f"{len(records):,} records; {len(positions)} sampled"
    if not bad:
        return CheckResult(check, "ok", f"{summary}, all valid")
    status = "error" if len(bad) * 2 >= len(positions) else "warning"
    pair = " (stage 1's plain template takes one human/gpt pair per record)" if plain_pair else ""
    return CheckResult(check, status, f"{summary}: {len(bad)} bad{pair}; first: {path}: {bad[0]}",
                       "bad records are skipped and listed in RUN/<stage>/skipped.jsonl; fix the file (or the images "
                       "folder) if that many should not be")


# ---------------------------------------------------------------------------------------------- judge
def _judge_key(pipeline: Pipeline) -> tuple[str | None, str]:
    """(the key, where it came from); never shown."""
    from llava_hpc.eval.endpoint import key_from_file

    config = pipeline.judge
    if os.environ.get(config.api_key_env):
        return os.environ[config.api_key_env], f"${config.api_key_env}"
    key = key_from_file(pipeline)
    return (key, str(config.key_file())) if key else (None, "")


def check_judge(pipeline: Pipeline, online: bool = False) -> list[CheckResult]:
    judged = judged_benches(pipeline)
    if not judged:
        return [CheckResult("judge", "skipped", "no judged bench (exact-match benches need no judge)")]
    from llava_hpc.eval.endpoint import OPENAI_URL, job_key_problem, judge_placement

    config = pipeline.judge
    url = config.base_url or OPENAI_URL
    results = []
    as_job = pipeline.executor == "slurm" and judge_placement(pipeline).as_job
    key, _ = _judge_key(pipeline)
    if as_job:
        problem = job_key_problem(pipeline)
        results.append(CheckResult("judge key", "error", problem.split(". Create it once")[0], problem.split("with\n")[-1]
                                   .strip()) if problem else
                       CheckResult("judge key", "ok", f"the judge job reads its key from {config.key_file()}"))
    elif os.environ.get(config.api_key_env):
        results.append(CheckResult("judge key", "ok", f"${config.api_key_env} is set (judging from the login side)"))
    elif config.base_url:
        results.append(CheckResult("judge key", "ok", f"${config.api_key_env} is not set: no key is sent to "
                                   f"{config.base_url} (a local server usually needs none)"))
    else:
        results.append(CheckResult("judge key", "error", f"${config.api_key_env} is not set; {url} needs a key "
                                   f"(benches {', '.join(judged)})",
                                   f"export {config.api_key_env}=... in the login shell before `llava-hpc judge` "
                                   "(never in the pipeline file)"))
    if not online:
        results.append(CheckResult("judge endpoint", "skipped", f"{url} not contacted (--online sends one request of "
                                   "max_tokens=1)"))
        return results
    if key is None and not config.base_url:
        results.append(CheckResult("judge endpoint", "skipped", f"no key to send to {url}"))
        return results
    results.append(ping_judge(pipeline, key))
    return results


def ping_judge(pipeline: Pipeline, key: str | None) -> CheckResult:
    """One chat completion of max_tokens=1 to the judge's endpoint: latency, or the error (the key scrubbed out)."""
    import openai

    config = pipeline.judge
    url = config.base_url or "https://api.openai.com/v1"
    client = openai.OpenAI(api_key=key or "no-key", base_url=config.base_url, max_retries=0,
                           timeout=min(config.timeout_s, 30.0))
    started = time.monotonic()
    try:
        reply = client.chat.completions.create(model=config.model, max_tokens=1,
                                               messages=[{"role": "user", "content": "Say OK."}])
    except openai.APIError as exc:
        message = str(exc)
        if key:
            message = message.replace(key, "***")
        hint = {401: "the key is wrong or revoked", 403: "the key may not use this model or endpoint",
                404: f"no model {config.model!r} (or no such endpoint) at {url}",
                429: "rate limit or exhausted quota"}.get(getattr(exc, "status_code", None), "")
        return CheckResult("judge endpoint", "error", f"{url} ({config.model}): {type(exc).__name__}: {message[:300]}",
                           hint or "check judge.base_url and judge.model; `curl` the endpoint from this machine")
    finally:
        client.close()
    latency = time.monotonic() - started
    model = getattr(reply, "model", None) or config.model
    return CheckResult("judge endpoint", "ok", f"{url} answered in {latency * 1000:.0f} ms (model {model})")


# ---------------------------------------------------------------------------------------------- the probe job
def probe_script(pipeline: Pipeline, stage: str, out_dir: Path, python: str | None = None) -> str:
    """The sbatch script of the probe: the training stage's partition, account, QOS, nodes; one task and (on a GPU
    partition) one GPU per node; `PROBE_TIME_LIMIT_MIN` minutes."""
    resources = pipeline.resources(stage)
    python = python or pipeline.python or sys.executable
    lines = ["#!/bin/bash", "#SBATCH --job-name=llava-doctor",
             f"#SBATCH --nodes={resources.nodes}", "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --cpus-per-task={min(resources.cpus, 4)}", f"#SBATCH --time={PROBE_TIME_LIMIT_MIN}",
             f"#SBATCH --output={out_dir}/slurm-%j.out"]
    for option, value in (("partition", resources.partition), ("account", resources.account), ("qos", resources.qos),
                          ("constraint", resources.constraint), ("wckey", resources.wckey)):
        if value:
            lines.append(f"#SBATCH --{option}={value}")
    if resources.gpus:
        lines.append("#SBATCH --gpus-per-node=1")
    if resources.mem_gb:
        lines.append(f"#SBATCH --mem={max(1, int(min(resources.mem_gb, 4)))}G")
    for key, value in resources.additional.items():
        lines.append(f"#SBATCH --{key}={value}")
    code = "import sys; from llava_hpc.doctor import probe_task; sys.exit(probe_task(sys.argv[1]))"
    lines += [*resources.setup,
              'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
              "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
              f"srun --nodes={resources.nodes} --ntasks-per-node=1 --cpus-per-task={min(resources.cpus, 4)} "
              f"--kill-on-bad-exit=1 {shlex.quote(python)} -c {shlex.quote(code)} {shlex.quote(str(out_dir))}", ""]
    return "\n".join(lines)


def probe_task(out_dir: str) -> int:
    """One Slurm task of the probe (one per node): CUDA and bf16 here, a gloo all-reduce across the tasks, and a
    marker `node-<rank>.json` in the run directory that says so."""
    rank = int(os.environ.get("SLURM_PROCID", 0))
    world = int(os.environ.get("SLURM_NTASKS", 1))
    import socket

    result: dict = {"rank": rank, "world": world, "host": socket.gethostname(),
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "cuda": None, "gpu": None,
                    "capability": None, "bf16": None, "allreduce": None, "expected": world * (world + 1) / 2,
                    "error": None}
    code = 0
    try:
        import datetime

        import torch

        if torch.cuda.is_available():
            result.update(cuda=True, gpu=torch.cuda.get_device_name(0),
                          capability=list(torch.cuda.get_device_capability(0)))
            try:
                result["bf16"] = bool(torch.cuda.is_bf16_supported(including_emulation=False))
            except TypeError:  # older torch: no emulation argument
                result["bf16"] = bool(torch.cuda.is_bf16_supported())
            result["bf16"] = result["bf16"] and tuple(result["capability"]) >= (8, 0)  # as train/loop.native_bf16
        else:
            result["cuda"] = False
        address = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(os.environ.get("MASTER_PORT", 29500))
        torch.distributed.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=rank,
                                             world_size=world, timeout=datetime.timedelta(seconds=60))
        try:
            tensor = torch.tensor([float(rank + 1)])
            torch.distributed.all_reduce(tensor)
            result["allreduce"] = float(tensor.item())
        finally:
            torch.distributed.destroy_process_group()
        if result["allreduce"] != result["expected"]:
            code = 1
    except Exception as exc:  # noqa: BLE001 - reported in the marker, which is the point of the probe
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
        code = 1
    finally:
        target = Path(out_dir) / f"node-{rank}.json"
        temporary = target.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(json.dumps(result))
        os.replace(temporary, target)
    return code


def _sbatch_env(pipeline: Pipeline) -> dict:
    """sbatch exports the submitting environment to the job (and Slurm stores it): no secrets."""
    return {k: v for k, v in without_secrets(os.environ).items() if k != pipeline.judge.api_key_env}


def run_probe(pipeline: Pipeline, timeout_s: float = PROBE_TIMEOUT_S, poll_s: float = 2.0,
              run: Callable[..., CommandResult] | None = None, say: Callable[[str], None] | None = None
              ) -> list[CheckResult]:
    """Submit the probe job, wait for it (at most `timeout_s`, then cancel it), and read the nodes' markers."""
    run = run or run_command
    stage = training_stage(pipeline)
    if stage is None:
        return [CheckResult("probe job", "skipped", "no training stage in the pipeline: nothing to probe")]
    resources = pipeline.resources(stage)
    out_dir = Path(pipeline.run_dir) / "doctor" / f"probe-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    try:
        out_dir.mkdir(parents=True)
    except OSError as exc:
        return [CheckResult("probe job", "error", f"cannot create {out_dir}: {exc.strerror or exc}",
                            "make run_dir writable")]
    script = out_dir / "probe.sbatch"
    script.write_text(probe_script(pipeline, stage, out_dir))
    submitted = run(["sbatch", "--parsable", str(script)], timeout=60, env=_sbatch_env(pipeline))
    where = f"{resources.partition or 'default partition'}, {resources.nodes} node(s)"
    if not submitted.ok:
        return [CheckResult("probe job", "error", f"sbatch refused the probe ({where}): {submitted.why()}",
                            "fix the account/partition/GPU lines above; the script is " + str(script))]
    job = submitted.stdout.strip().split(";")[0]
    if say:
        say(f"probe job {job} submitted ({where}); waiting up to {timeout_s:.0f} s")
    started = time.monotonic()
    state, reason, timed_out = "PENDING", "", False
    try:
        while True:
            queue = run(["squeue", "-h", "-j", job, "-o", "%T|%r"])
            line = queue.stdout.strip().splitlines()[0] if queue.ok and queue.stdout.strip() else ""
            if line:
                state, _, reason = line.partition("|")
            if (queue.ok and not line) or state in _TERMINAL or state.startswith("CANCELLED"):
                break
            if time.monotonic() - started > timeout_s:
                timed_out = True
                run(["scancel", job])
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        run(["scancel", job])  # no probe left behind in the queue
        raise
    elapsed = time.monotonic() - started
    for _ in range(5):  # accounting can lag the queue by a second or two
        acct = run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State,ExitCode"])
        text = acct.stdout.strip().splitlines()[0] if acct.ok and acct.stdout.strip() else ""
        if text and text.split("|")[0].split()[0] in _TERMINAL | {"CANCELLED"}:
            state = text.split("|")[0].split()[0]
            break
        if timed_out:
            break
        time.sleep(1.0)
    markers = []
    for path in sorted(out_dir.glob("node-*.json")):
        try:
            markers.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    log = out_dir / f"slurm-{job}.out"
    tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
    results = probe_results(pipeline, stage, job, state, reason, timed_out, elapsed, markers, tail, timeout_s)
    if all(r.status != "error" for r in results):
        for path in out_dir.iterdir():
            path.unlink()
        out_dir.rmdir()
        try:
            out_dir.parent.rmdir()  # RUN/doctor, if nothing else is in it
        except OSError:
            pass
    else:
        results[0].fix = (results[0].fix + "; " if results[0].fix else "") + f"the probe's files: {out_dir}"
    return results


def probe_results(pipeline: Pipeline, stage: str, job: str, state: str, reason: str, timed_out: bool, elapsed: float,
                  markers: list[dict], log_tail: list[str], timeout_s: float = PROBE_TIMEOUT_S) -> list[CheckResult]:
    """What the probe's job state and its nodes' markers say (a pure function: the tests feed it markers)."""
    resources = pipeline.resources(stage)
    nodes = resources.nodes
    hosts = ", ".join(m["host"] for m in sorted(markers, key=lambda m: m["rank"]))
    tail = f"; log: {' | '.join(log_tail)}" if log_tail else ""
    if timed_out and not markers and state == "PENDING":
        return [CheckResult("probe job", "warning", f"job {job} still pending after {timeout_s:.0f} s "
                            f"({reason or 'no reason given'}); cancelled",
                            "the partition is busy: rerun `llava-hpc doctor --probe` later"),
                CheckResult("compute nodes", "skipped", "the probe did not run")]
    if timed_out:
        job_row = CheckResult("probe job", "error", f"job {job} did not finish within {timeout_s:.0f} s ({state}); "
                              f"cancelled{tail}", "a hang between nodes: see the all-reduce row")
    elif state != "COMPLETED":
        job_row = CheckResult("probe job", "error", f"job {job} ended {state}{tail}",
                              "read the probe's log (below) for why")
    else:
        job_row = CheckResult("probe job", "ok", f"job {job} ran on {hosts} in {elapsed:.0f} s ({stage}'s "
                              f"{resources.partition or 'default partition'}, {nodes} node(s))")
    results = [job_row]
    if len(markers) < nodes:
        results.append(CheckResult("compute nodes", "error", f"{len(markers)} of {nodes} node(s) wrote their marker "
                                   f"into {pipeline.run_dir}{' (' + hosts + ')' if hosts else ''}",
                                   "put run_dir on a filesystem the compute nodes mount and can write"))
    else:
        results.append(CheckResult("compute nodes", "ok", f"{hosts} wrote into {pipeline.run_dir}"))
    if not markers:
        return results
    results.append(_bf16_row(pipeline, markers))
    errors = [f"{m['host']}: {m['error']}" for m in markers if m.get("error")]
    values = {m.get("allreduce") for m in markers}
    expected = markers[0].get("expected")
    if errors:
        results.append(CheckResult("all-reduce", "error", "; ".join(errors)[:400],
                                   "nodes must reach the first node's MASTER_ADDR:MASTER_PORT (firewall? hostname "
                                   "resolution?)"))
    elif len(markers) < nodes or values != {expected}:
        results.append(CheckResult("all-reduce", "error", f"results {sorted(map(str, values))}, expected {expected} "
                                   f"from {nodes} node(s)", "see the probe's log"))
    else:
        results.append(CheckResult("all-reduce", "ok", f"gloo all_reduce over {len(markers)} node(s) ({hosts}): "
                                   f"{expected}"))
    return results


def _bf16_row(pipeline: Pipeline, markers: list[dict]) -> CheckResult:
    wants_bf16 = [s for s in ("stage1", "stage2")
                  if getattr(pipeline.stages, s) is not None and getattr(pipeline.stages, s).precision == "bf16"]
    no_cuda = [m for m in markers if not m.get("cuda")]
    if len(no_cuda) == len(markers):
        seen = markers[0].get("cuda_visible_devices")
        why = "torch could not start" if markers[0].get("error") and markers[0].get("cuda") is None else \
            "no CUDA on the node"
        return CheckResult("bf16", "warning", f"{why} (CUDA_VISIBLE_DEVICES={seen}): bf16 not checked",
                           "a CUDA build of torch in the jobs' venv, and a GPU partition" if seen is None else
                           "install a CUDA build of torch in the jobs' venv (fine on a CPU-only test cluster)")
    without = [m for m in markers if m.get("cuda") and not m.get("bf16")]
    gpus = ", ".join(dict.fromkeys(f"{m['gpu']} (sm {'.'.join(map(str, m['capability']))})" for m in markers
                                   if m.get("cuda")))
    if without and wants_bf16:
        return CheckResult("bf16", "error", f"{gpus}: no native bf16, but {', '.join(wants_bf16)} set precision = "
                           "'bf16'", "set precision = \"fp16\" (loss scaling) or \"auto\" for those stages")
    if without:
        return CheckResult("bf16", "warning", f"{gpus}: no native bf16; precision 'auto' trains in fp16 there")
    return CheckResult("bf16", "ok", f"{gpus}: native bf16")


# ---------------------------------------------------------------------------------------------- all of it
def run_checks(pipeline: Pipeline, online: bool = False, probe: bool = False, pipeline_warnings: list[str] | None = None,
               source: str | Path | None = None, run: Callable[..., CommandResult] | None = None,
               say: Callable[[str], None] | None = None, probe_timeout_s: float = PROBE_TIMEOUT_S) -> list[CheckResult]:
    """Every check, in the order a user fixes things."""
    results = [pipeline_row(pipeline, pipeline_warnings or [], source)]
    facts = None
    if pipeline.executor != "slurm":
        results.append(CheckResult("slurm", "skipped", f"executor = '{pipeline.executor}': no Slurm involved"))
    else:
        facts = slurm_facts(run)
        results += check_slurm(pipeline, facts)
        if facts.reachable:
            results += _guarded("account", check_account, pipeline, facts)
            results += _guarded("partitions", check_partitions, pipeline, facts)
        else:
            results += [CheckResult(name, "skipped", "Slurm is not reachable") for name in ("account", "partitions")]
    results += _guarded("run dir", check_run_dir, pipeline, run)
    results += _guarded("models", check_models, pipeline)
    results += _guarded("data", check_data, pipeline)
    results += _guarded("judge", check_judge, pipeline, online)
    if probe:
        if facts is None or not facts.reachable:
            results.append(CheckResult("probe job", "skipped", "no Slurm to submit to"))
        else:
            probed = _guarded("probe job", lambda: run_probe(pipeline, run=run, say=say, timeout_s=probe_timeout_s))
            results += probed
            if any(r.name == "compute nodes" and r.status == "ok" for r in probed):
                for row in results:
                    if row.name == "filesystem" and row.status == "warning":
                        row.status, row.fix = "ok", ""
                        row.detail += "; but the probe's compute nodes wrote into it, so it is shared here"
    elif pipeline.executor == "slurm":
        results.append(CheckResult("probe job", "skipped", "bf16, compute-node writes and the all-reduce are checked "
                                   "with --probe (a 1-minute job)"))
    return results


def pipeline_row(pipeline: Pipeline, warnings: list[str], source: str | Path | None = None) -> CheckResult:
    """The pipeline loaded without checking files: unset variables (once each) and missing files."""
    unset, others = [], []
    for warning in dict.fromkeys(warnings):
        text = re.sub(r"^\S+?\.toml: ", "", warning)
        match = re.match(r"environment variable (\w+) is not set", text)
        if match:
            unset.append(match.group(1))
        else:
            others.append(text)
    unset = list(dict.fromkeys(unset))
    if not unset and not others:
        return CheckResult("pipeline", "ok", f"{source or pipeline.name}: valid")
    parts = ([f"environment variable(s) not set: {', '.join(unset)}"] if unset else []) + others
    fix = (f"export {unset[0]}=... (and the others) before llava-hpc commands" if unset else
           "fix the paths (or fetch the files)")
    return CheckResult("pipeline", "warning", "; ".join(parts), fix)


def _guarded(name: str, check: Callable[..., list[CheckResult]], *args) -> list[CheckResult]:
    """A check that fails in an unforeseen way is a row that says so, never the end of the report."""
    try:
        return check(*args)
    except Exception as exc:  # noqa: BLE001
        return [CheckResult(name, "error", f"the check itself failed: {type(exc).__name__}: {exc}",
                            "please report this with the pipeline file")]
