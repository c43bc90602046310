"""Which environment variables hold secrets: they never reach sbatch (Slurm stores a job's environment with the
job, where admins and tools can read it: controller state, `sacct --env-vars`)."""

from __future__ import annotations

import re
from collections.abc import Mapping

SECRET_NAME = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.I)


def is_secret(name: str) -> bool:
    return SECRET_NAME.search(name) is not None


def without_secrets(environ: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in environ.items() if not is_secret(name)}
