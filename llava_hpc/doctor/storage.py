"""The run directory: writable here, on a filesystem the compute nodes share (a guess from its type and path,
proved by `--probe`), and with room for the features the features stage would store."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from llava_hpc.config import Pipeline
from llava_hpc.doctor.result import CheckResult
from llava_hpc.doctor.slurm import CommandResult, planned_stages, run_command

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
