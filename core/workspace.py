"""Where the workbench keeps its files: the workspace folder and the paths inside it.

`WORKBENCH_HOME` selects the workspace (default ./workspace); `WORKBENCH_MODELS` may point
the embedded models somewhere shared (tests use this so every test workspace reuses one
prepared copy). Nothing here creates data; it only names places.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("WORKBENCH_HOME") or "workspace").expanduser().resolve()


def db_path() -> Path:
    return home() / "workbench.sqlite"


def models_dir() -> Path:
    override = os.environ.get("WORKBENCH_MODELS")
    return Path(override).expanduser().resolve() if override else home() / "models"


def jobs_dir() -> Path:
    return home() / "jobs"


def artifacts_dir() -> Path:
    return home() / "artifacts"
