"""The pipeline file (TOML): typed, validated, with errors that name the file, the key and what was expected.

Relative paths are resolved against the pipeline file's folder; `~` and `$VARS` are expanded, so one recipe
can say `$LLAVA_DATA/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json` and work on any cluster.
The resolved pipeline (absolute paths, CLI overrides applied) is what lands in `RUN/pipeline.toml`; jobs read
that copy. Secrets never live here: the judge names the environment variable that holds the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.functional_validators import AfterValidator, BeforeValidator

from llava_hpc import PIPELINE_ENV
from llava_hpc.eval.benches import BENCH_KINDS
from llava_hpc.model.specs import TinyLLMSpec, TinyVisionSpec
from llava_hpc.stages import ORDER

DEFAULT_PIPELINE = "pipeline.toml"


class PipelineError(ValueError):
    """A pipeline file that cannot be used; the message names the file and the key."""


# ---------------------------------------------------------------------------------------------- path fields
def _expand_path(value: Any, info: ValidationInfo) -> Any:
    if value is None or isinstance(value, Path) and value.is_absolute():
        return value
    if not isinstance(value, (str, Path)):
        return value  # the str/Path validator reports the type
    text = os.path.expandvars(os.path.expanduser(str(value)))
    missing = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text)
    if missing:
        context = info.context or {}
        if context.get("check_files", True):
            raise ValueError(f"environment variable {missing[0]} is not set (in {value!r})")
        # A dry run on a laptop: the cluster's variables are not set here. Keep the path as written, say so.
        context.setdefault("warnings", []).append(f"environment variable {missing[0]} is not set (in {value!r})")
        return Path(text)
    path = Path(text)
    base = (info.context or {}).get("base")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path.resolve() if path.is_absolute() else path


def _must_exist(path: Path | None, info: ValidationInfo) -> Path | None:
    if path is None or path.exists():
        return path
    context = info.context or {}
    if context.get("check_files", True):
        raise ValueError(f"no such file or folder: {path}")
    if "$" not in str(path):  # an unset variable was reported already
        context.setdefault("warnings", []).append(f"no such file or folder: {path}")
    return path


ResolvedPath = Annotated[Path, BeforeValidator(_expand_path)]
ExistingPath = Annotated[Path, BeforeValidator(_expand_path), AfterValidator(_must_exist)]

# Values that end up in `#SBATCH` lines: a newline or a shell metacharacter there would let a pipeline file
# inject commands into the job script.
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.\-,]+$")
_SLURM_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.\-,&|\[\]*:!()]+$")


def _slurm_name(value: str | None) -> str | None:
    if value is not None and not _SLURM_NAME.match(value):
        raise ValueError(f"{value!r} is not a Slurm name (letters, digits, '_', '.', '-', ',' only)")
    return value


def _slurm_constraint(value: str | None) -> str | None:
    if value is not None and not _SLURM_CONSTRAINT.match(value):
        raise ValueError(f"{value!r} is not a Slurm constraint expression")
    return value


SlurmName = Annotated[str, AfterValidator(_slurm_name)]


def parse_time_minutes(value: str | int) -> int:
    """Slurm time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS -> whole minutes (rounded up)."""
    if isinstance(value, bool):
        raise ValueError("expected a time such as 90, '4:00:00' or '1-12:00:00'")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("time must be positive")
        return value
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise ValueError(f"{value!r} is not a Slurm time (90, '4:00:00', '1-12:00:00')")
    days, a, b, c = match.groups()
    numbers = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        total = int(days) * 1440 + hours * 60 + minutes + seconds / 60
    elif len(numbers) == 1:
        total = numbers[0]
    elif len(numbers) == 2:
        total = numbers[0] + numbers[1] / 60
    else:
        total = numbers[0] * 60 + numbers[1] + numbers[2] / 60
    if total <= 0:
        raise ValueError("time must be positive")
    return math.ceil(total)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------- resources
class Resources(Strict):
    """Slurm resources of one job (each array task gets these)."""

    partition: SlurmName | None = None
    account: SlurmName | None = None
    qos: SlurmName | None = None
    constraint: str | None = None
    gpus: int = Field(0, ge=0, description="GPUs per node")
    cpus: int = Field(2, ge=1, description="CPUs per task")
    mem_gb: float | None = Field(None, gt=0)
    time: int = Field(60, description="time limit in minutes (TOML may say '4:00:00')")
    nodes: int = Field(1, ge=1)
    tasks_per_node: int = Field(1, ge=1)
    setup: list[str] = Field(default_factory=list, description="shell lines run before the job, e.g. module load")
    array_parallelism: int = Field(64, ge=1)
    max_requeues: int = Field(3, ge=0, description="requeues after a timeout (preemption always requeues)")
    signal_delay_s: int = Field(120, ge=10, description="USR2 this long before the time limit: time to checkpoint")
    exclusive: bool = False
    wckey: SlurmName | None = Field(None, description="Slurm workload characterization key, where the site uses them")
    additional: dict[str, str] = Field(default_factory=dict, description="extra sbatch options")

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, value):
        return parse_time_minutes(value)

    @field_validator("constraint")
    @classmethod
    def _constraint(cls, value):
        return _slurm_constraint(value)

    @field_validator("setup")
    @classmethod
    def _setup(cls, lines):
        for line in lines:
            if "\n" in line or "\r" in line:
                raise ValueError("each setup entry must be one line")
        return lines

    @field_validator("additional")
    @classmethod
    def _additional(cls, extra):
        for key, value in extra.items():
            if not re.fullmatch(r"[a-z][a-z0-9_\-]*", key) or re.search(r"[\s;&|`$<>\\'\"]", value):
                raise ValueError(f"additional sbatch option {key}={value!r} is not allowed (no spaces or shell characters)")
        return extra


class ResourceOverrides(Strict):
    """A stage's `[stages.X.slurm]` table: only what it sets overrides the top-level `[slurm]` defaults."""

    partition: SlurmName | None = None
    account: SlurmName | None = None
    qos: SlurmName | None = None
    constraint: str | None = None
    gpus: int | None = Field(None, ge=0)
    cpus: int | None = Field(None, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    time: int | None = None
    nodes: int | None = Field(None, ge=1)
    tasks_per_node: int | None = Field(None, ge=1)
    setup: list[str] | None = None
    array_parallelism: int | None = Field(None, ge=1)
    max_requeues: int | None = Field(None, ge=0)
    signal_delay_s: int | None = Field(None, ge=10)
    exclusive: bool | None = None
    wckey: SlurmName | None = None
    additional: dict[str, str] | None = None

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, value):
        return None if value is None else parse_time_minutes(value)

    @field_validator("constraint")
    @classmethod
    def _constraint(cls, value):
        return _slurm_constraint(value)

    def apply_to(self, base: Resources) -> Resources:
        values = base.model_dump()
        values.update(self.model_dump(exclude_none=True))
        return Resources.model_validate(values)


# ---------------------------------------------------------------------------------------------- model
class ModelConfig(Strict):
    vision_tower: str = Field("tiny", description="'tiny', a Hugging Face id or a local directory")
    vision_select_layer: int = -2
    image_aspect_ratio: Literal["crop", "pad"] = "crop"
    llm: str = Field("tiny", description="'tiny', 'smollm2', a Hugging Face id or a local directory")
    projector: Literal["linear", "mlp2x_gelu"] = "linear"
    standardize_features: bool = Field(
        False, description="scale each feature dimension to mean 0, std 1 (stage 1 measures it) before the projector; "
        "not in the reference; export folds it into the projector")
    template: Literal["chat_template", "vicuna_v1"] = "chat_template"
    max_length: int = Field(2048, ge=16)
    # The model's own dataclasses (torch-free, model/specs.py), validated as they are: one declaration, one default.
    tiny_vision: TinyVisionSpec = Field(default_factory=TinyVisionSpec)
    tiny_llm: TinyLLMSpec = Field(default_factory=TinyLLMSpec)


# ---------------------------------------------------------------------------------------------- data
class SyntheticConfig(Strict):
    seed: int = 0
    image_size: int = 64
    n_pretrain: int = Field(3000, ge=1)
    n_instruct: int = Field(3000, ge=1)
    n_bench: int = Field(200, ge=1)
    bench_categories: list[str] = Field(default_factory=lambda: ["colour", "position"])
    instruct_categories: list[str] = Field(default_factory=lambda: ["colour", "position", "shape", "background"])
    max_count: int = Field(1, ge=1, le=3, description="> 1 draws several copies and allows the 'count' category")
    shuffle_images: bool = Field(False, description="control: pair conversations with other samples' images")


class Dataset(Strict):
    kind: Literal["llava-json", "synthetic"]
    path: ExistingPath | None = Field(None, description="LLaVA JSON list of {id, image, conversations}")
    images: ExistingPath | None = Field(None, description="folder the records' image paths are relative to")
    split: Literal["pretrain", "instruct"] | None = Field(None, description="synthetic world split")
    max_samples: int | None = Field(None, ge=1, description="a seeded random subset (subset_seed), in file order")
    subset_seed: int = Field(0, description="seeds the max_samples subset of this dataset and of the stages using it")

    @model_validator(mode="after")
    def _fields_for_kind(self):
        if self.kind == "llava-json":
            missing = [name for name in ("path", "images") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"a llava-json dataset needs {' and '.join(missing)}")
        elif self.split is None:
            raise ValueError("a synthetic dataset needs split = 'pretrain' or 'instruct'")
        return self


# ---------------------------------------------------------------------------------------------- stages
class FeaturesStage(Strict):
    datasets: list[str] | None = Field(None, description="default: the datasets stage1 and stage2 train on")
    batch_size: int = Field(64, ge=1)
    shard_size: int = Field(1024, ge=1, description="samples per Parquet shard")
    array_tasks: int = Field(4, ge=1, description="array tasks per dataset; shards are dealt out round-robin")
    compression: Literal["zstd", "snappy", "none"] = "zstd"
    seed: int = Field(0, description="orders unique images into shards (a seeded shuffle, not file order)")
    slurm: ResourceOverrides = Field(default_factory=ResourceOverrides)


class TrainStage(Strict):
    dataset: str
    batch_size: int = Field(16, ge=1, description="per device micro-batch")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)
    projector_lr: float | None = Field(None, gt=0, description="the projector's own peak lr (the reference's "
                                       "mm_projector_lr), e.g. far above the LLM's in stage 2; default: lr")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_samples: int | None = Field(None, ge=1, description="a seeded random subset (the dataset's subset_seed) "
                                    "of the dataset's records")
    max_steps: int | None = Field(None, ge=1)
    seed: int = 0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward (~30 % slower steps, far less activation memory): off "
        "for models up to ~1.5B on GPUs of 40 GB or more; on for bigger models or smaller GPUs")
    overlong: Literal["truncate", "skip"] = "truncate"
    save_every_steps: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    zero_stage: Literal[0, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    shuffle_window_shards: int = Field(
        4, ge=1, description="feature shards shuffled together; a rank holds twice this many decoded shards in memory"
    )
    log_every_steps: int = Field(
        10, ge=1, description="a metrics.jsonl row (mean loss since the last) every so many steps; the first, the last "
        "and checkpoint steps always get one")
    tensorboard: bool = Field(True, description="TensorBoard event files in the stage's directory, mirroring "
                              "metrics.jsonl (offline, no account): `tensorboard --logdir RUN`")
    group_by_length: bool = Field(True, description="micro-batches of samples of similar length (less padding); "
                                  "where lengths give a sample's kind away and a step is one micro-batch, turn it off")
    slurm: ResourceOverrides = Field(default_factory=ResourceOverrides)


class Stage1Stage(TrainStage):
    template: Literal["plain", "chat_template", "vicuna_v1"] = Field(
        "plain", description="'plain' (LLaVA-1.5): the image, then the caption, the record's prompt dropped; or the "
        "conversation template, the record's prompt asking for the caption (LLaVA v1's paper), so the projector learns "
        "to be read inside a chat turn, where a small LLM asked questions later meets the image")


class GenerateStage(Strict):
    benches: list[str] | None = Field(None, description="default: every bench")
    model: Literal["stage2", "stage1"] = Field(
        "stage2", description="answer with the stage-2 model, or with the stage-1 projector on the base LLM"
    )
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    array_tasks: int = Field(1, ge=1)
    slurm: ResourceOverrides = Field(default_factory=ResourceOverrides)


class PlainStage(Strict):
    slurm: ResourceOverrides = Field(default_factory=ResourceOverrides)


# The [stages.<name>] table of each stage in llava_hpc.stages.ORDER (and in its order): its own settings where it has
# some, else only its Slurm resources. A training stage may be left out of a pipeline (None).
STAGE_TABLES: dict[str, tuple[Any, Any]] = {
    "features": (FeaturesStage, Field(default_factory=FeaturesStage)),
    "stage1": (Stage1Stage | None, None),
    "stage2": (TrainStage | None, None),
    "generate": (GenerateStage, Field(default_factory=GenerateStage)),
}
Stages = create_model(
    "Stages", __base__=Strict,
    **{name: STAGE_TABLES.get(name, (PlainStage, Field(default_factory=PlainStage))) for name in ORDER},
)


# ---------------------------------------------------------------------------------------------- evaluation
class Bench(Strict):
    kind: Literal[tuple(BENCH_KINDS)]  # declared in llava_hpc.eval.benches
    questions: ExistingPath | None = None
    answers: ExistingPath | None = Field(None, description="reference answers (GPT-4's for LLaVA-Bench)")
    context: ExistingPath | None = None
    rules: ExistingPath | None = None
    images: ExistingPath | None = None
    question: str | None = Field(None, description="folder benches: the question asked of every image")
    max_questions: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _fields_for_kind(self):
        missing = [name for name in BENCH_KINDS[self.kind].needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.kind} bench needs {', '.join(missing)}")
        return self


class JudgeConfig(Strict):
    model: str = "gpt-4o-2024-11-20"
    base_url: str | None = None
    transport: Literal["sync", "batch"] = "sync"
    max_concurrency: int = Field(8, ge=1)
    include_image: bool = False
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the environment variable holding the key")
    api_key_file: ResolvedPath | None = Field(
        None, description="where a judge *job* reads the key (Slurm stores a job's environment, so llava-hpc never "
                          "passes the key to sbatch); default ~/.config/llava-hpc/<api_key_env>, mode 0600")
    where: Literal["auto", "job", "login"] = Field(
        "auto", description="on Slurm: judge in a job ('job'), on the login side ('login'), or 'auto': in a job when "
                            "the transport is sync and compute nodes reach the endpoint, else on the login side")
    temperature: float = 0.2
    max_tokens: int = 1024
    max_retries: int = Field(5, ge=0)
    timeout_s: float = Field(120, gt=0)
    reference_model: str = Field("gpt-4o-mini", description="writes reference answers for folder benches")

    def key_file(self) -> Path:
        return self.api_key_file or Path(f"~/.config/llava-hpc/{self.api_key_env}").expanduser()

    @model_validator(mode="before")
    @classmethod
    def _no_secret(cls, data):
        if isinstance(data, dict) and any(k in data for k in ("api_key", "key", "token")):
            raise ValueError(
                "do not put an API key in the pipeline file (it is copied into the run directory); "
                "export it in the job's environment and name the variable with api_key_env"
            )
        return data


# ---------------------------------------------------------------------------------------------- cluster
class ClusterConfig(Strict):
    """What a site's partitions can reach; a cluster profile usually sets it."""

    internet_partitions: list[SlurmName] = Field(
        default_factory=list, description="partitions whose nodes reach the internet (most sites: none)")
    gpu_types: dict[SlurmName, SlurmName] = Field(
        default_factory=dict, description="partition -> the GPU GRES type its nodes report (sinfo -p P -o %G, e.g. "
                                          "'a40'); optional: `llava-hpc doctor` checks it")


# ---------------------------------------------------------------------------------------------- pipeline
class Pipeline(Strict):
    name: str
    profile: ResolvedPath | None = Field(None, description="a cluster profile: [slurm] defaults merged under this file's")
    run_dir: ResolvedPath
    executor: Literal["slurm", "local", "debug"] = "slurm"
    python: str | None = Field(None, description="python of the jobs (default: the one running llava-hpc)")
    slurm: Resources = Field(default_factory=Resources)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    datasets: dict[str, Dataset] = Field(default_factory=dict)
    stages: Stages = Field(default_factory=Stages)
    benches: dict[str, Bench] = Field(default_factory=dict)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)

    @model_validator(mode="after")
    def _references(self):
        for stage_name in ("stage1", "stage2"):
            stage = getattr(self.stages, stage_name)
            if stage is not None and stage.dataset not in self.datasets:
                raise ValueError(
                    f"stages.{stage_name}.dataset = {stage.dataset!r} is not a dataset; defined: {sorted(self.datasets)}"
                )
        for name in self.stages.features.datasets or []:
            if name not in self.datasets:
                raise ValueError(f"stages.features.datasets names {name!r}, which is not a dataset; defined: {sorted(self.datasets)}")
        for name in self.stages.generate.benches or []:
            if name not in self.benches:
                raise ValueError(f"stages.generate.benches names {name!r}, which is not a bench; defined: {sorted(self.benches)}")
        return self

    # -- derived views used by the stages and the scheduler
    def resources(self, stage: str) -> Resources:
        return getattr(self.stages, stage).slurm.apply_to(self.slurm)

    def feature_datasets(self) -> list[str]:
        if self.stages.features.datasets is not None:
            return list(self.stages.features.datasets)
        used = [s.dataset for s in (self.stages.stage1, self.stages.stage2) if s is not None]
        return list(dict.fromkeys(used)) or list(self.datasets)

    def generate_benches(self) -> list[str]:
        return list(self.stages.generate.benches) if self.stages.generate.benches is not None else list(self.benches)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))


# An unknown key: in a pydantic table; in a table the model's own dataclasses declare (model/specs.py).
_UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument")


def _describe(error: dict) -> str:
    location = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind in _UNKNOWN_KEY:
        return f"{location}: unknown key"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "missing":
        return f"{location}: required key is missing"
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{location}: {message}{shown}" if location else f"{message}{shown}"


def _table_fields(table: Any) -> dict[str, Any] | None:
    """A table's keys -> their annotations, for a pydantic model or a dataclass; None for anything else."""
    if isinstance(table, type) and issubclass(table, BaseModel):
        return {name: field.annotation for name, field in table.model_fields.items()}
    if isinstance(table, type) and dataclasses.is_dataclass(table):
        hints = typing.get_type_hints(table)
        return {field.name: hints[field.name] for field in dataclasses.fields(table)}
    return None


def _known_keys_hint(error: dict) -> str:
    """For an unknown key: the close match ("did you mean 'batch_size'?", a typo is the usual cause), else the keys
    that the table does take."""
    fields = _table_fields(Pipeline)
    for part in error["loc"][:-1]:
        annotation = fields.get(str(part)) if isinstance(part, str) else None
        if annotation is None:
            continue
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [f for f in map(_table_fields, candidates) if f is not None]
        if nested:
            fields = nested[0]
    known = sorted(fields)
    close = difflib.get_close_matches(str(error["loc"][-1]), known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "expected one of: " + ", ".join(known)


def _line_of(text: str, location: tuple) -> int | None:
    """The line of a key in the TOML text: after its table's header when it has one ([stages.stage1]), else the
    first line that sets it. None when not found (an inline table, a profile's key)."""
    if not text or not location or not isinstance(location[-1], str):
        return None
    lines = text.splitlines()
    key = re.compile(rf"^\s*{re.escape(location[-1])}\s*=")
    table = ".".join(str(part) for part in location[:-1])
    start = 0
    if table:
        header = re.compile(rf"^\s*\[\s*{re.escape(table)}\s*\]")
        start = next((n for n, line in enumerate(lines) if header.match(line)), 0)
    for number in range(start, len(lines)):
        if number > start and table and lines[number].lstrip().startswith("["):
            break
        if key.match(lines[number]):
            return number + 1
    return None


def parse_pipeline(data: dict, source: str | Path, base: Path | None = None, check_files: bool = True,
                   warnings: list[str] | None = None, text: str = "") -> Pipeline:
    """`check_files=False` (a dry run, `validate --no-check-files`): missing files and unset variables are not errors;
    they are appended to `warnings` (named by file and key) for the caller to show."""
    base = Path(source).resolve().parent if base is None else base
    context = {"base": base, "check_files": check_files, "warnings": []}
    try:
        pipeline = Pipeline.model_validate(data, context=context)
        if warnings is not None:
            warnings.extend(f"{source}: {w}" for w in dict.fromkeys(context["warnings"]))
        return pipeline
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            line = _describe(error)
            if error["type"] in _UNKNOWN_KEY:
                line += f"; {_known_keys_hint(error)}"
            number = _line_of(text, tuple(error["loc"]))
            lines.append(f"  line {number}: {line}" if number else f"  {line}")
        raise PipelineError(f"{source}: invalid pipeline file\n" + "\n".join(lines)) from None


def _read_toml(path: Path, what: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PipelineError(f"{path}: {what} not found") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{path}: not valid TOML: {exc}") from None


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _apply_profile(data: dict, source: Path) -> dict:
    """A cluster profile holds only what a site decides: Slurm resources (`[slurm]`, `[stages.<stage>.slurm]`) and
    what its partitions reach (`[cluster]`). The pipeline's own values win over the profile's."""
    if not isinstance(data.get("profile"), str):
        return data
    profile_path = Path(os.path.expandvars(os.path.expanduser(data["profile"])))
    if not profile_path.is_absolute():
        profile_path = source.resolve().parent / profile_path
    profile = _read_toml(profile_path, "profile (from the pipeline's `profile` key)")
    for key, table in profile.items():
        stage_tables = table.values() if key == "stages" and isinstance(table, dict) else []
        if key not in ("slurm", "cluster", "stages") or any(not isinstance(t, dict) or set(t) - {"slurm"} for t in stage_tables):
            raise PipelineError(f"{profile_path}: a profile may only set [slurm], [cluster] and [stages.<stage>.slurm] "
                                f"tables (found {key!r})")
    return _merge(profile, data)


def load_pipeline(path: str | Path, check_files: bool = True, warnings: list[str] | None = None) -> Pipeline:
    path = Path(path)
    data = _apply_profile(_read_toml(path, "pipeline file"), path)
    return parse_pipeline(data, path, check_files=check_files, warnings=warnings, text=path.read_text())


def find_pipeline(explicit: str | Path | None) -> Path:
    """--pipeline, else $LLAVA_HPC_PIPELINE, else ./pipeline.toml."""
    if explicit:
        return Path(explicit)
    if os.environ.get(PIPELINE_ENV):
        return Path(os.environ[PIPELINE_ENV])
    default = Path(DEFAULT_PIPELINE)
    if default.exists():
        return default
    raise PipelineError(
        f"no pipeline given: pass --pipeline FILE, set ${PIPELINE_ENV}, or create ./{DEFAULT_PIPELINE} "
        "(try `llava-hpc run -p pipelines/demo.toml`)"
    )


def with_resource_overrides(pipeline: Pipeline, stages: list[str], **overrides: Any) -> Pipeline:
    """Apply CLI flags (--partition, --time, ...) to the given stages' resources; returns a new pipeline."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return pipeline
    data = pipeline.model_dump(mode="json", exclude_none=True)
    for stage in stages:
        table = data["stages"].setdefault(stage, {}) or {}
        table.setdefault("slurm", {}).update(overrides)
        data["stages"][stage] = table
    try:
        return Pipeline.model_validate(data, context={"check_files": False})
    except ValidationError as exc:
        problems = "; ".join(_describe(e).split(": ", 1)[-1] for e in exc.errors())
        raise PipelineError(f"command-line option: {problems}") from None
