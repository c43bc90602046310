"""What the jobs read: the models (resolvable offline), the datasets (a seeded sample of records checked), and the
judge (its key, and with `--online` one tiny request to its endpoint)."""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

from llava_hpc.config import Pipeline
from llava_hpc.doctor.result import CheckResult
from llava_hpc.doctor.storage import dataset_records, planned_images
from llava_hpc.eval.benches import judged_benches

SAMPLE_RECORDS = 100
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


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
    stage1 = pipeline.stages.stage1
    plain = stage1.dataset if stage1 is not None and stage1.template == "plain" else None
    for name in _used_datasets(pipeline):
        results.append(check_dataset(pipeline, name, sample, plain_pair=name == plain))
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
