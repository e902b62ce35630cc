"""llama.cpp's GGUF converters, fetched once for the installed engine, and the way to run them.

The two convert scripts (convert_lora_to_gguf.py, convert_hf_to_gguf.py) and what they import are
taken from the llama-cpp-python sdist of the installed version, so the files they write match the
engine that loads them. They run as subprocesses with the vendored gguf package first on the path;
a failure becomes one ConversionError line. This module only fetches and runs: what is converted,
and where it lands, is core.packaging's business. It never imports core.models (models imports it).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import core
from core import workspace
from core.errors import WorkbenchError

Progress = Callable[[str], None]

CONVERTERS_DIR_NAME = "llama.cpp-converters"
CONVERTERS_MARKER = "VERSION"  # holds the llama-cpp-python version the scripts came from
# What the two convert scripts need from the vendored llama.cpp tree (found by running them):
# their model classes (conversion/), the gguf package newer than PyPI's (gguf-py/gguf/) and the
# chat templates a few architectures read (models/templates/).
CONVERTER_FILES = (
    "convert_lora_to_gguf.py",
    "convert_hf_to_gguf.py",
    "conversion/",
    "gguf-py/gguf/",
    "models/templates/",
    "LICENSE",
)
# Where `python -m core.…` finds this package in a converter's subprocess, whatever its working folder.
_PROJECT_ROOT = str(Path(core.__file__).resolve().parent.parent)


class ConversionError(WorkbenchError):
    """A converter could not turn the adapter or the merged model into GGUF (the reason in one line)."""


def converters_dir() -> Path:
    return workspace.models_dir() / CONVERTERS_DIR_NAME


def engine_version() -> str:
    """The installed llama-cpp-python's version (llama_cpp.__version__), read without loading the library."""
    return importlib.metadata.version("llama_cpp_python")


def converters_ready() -> bool:
    marker = converters_dir() / CONVERTERS_MARKER
    return marker.exists() and marker.read_text().strip() == engine_version()


def prepare_converters(progress: Progress = print) -> Path:
    """llama.cpp's convert scripts of the installed engine's version, fetched once from PyPI (~76 MB sdist, ~25 s).

    Only the scripts and what they import are kept; the sdist is deleted. A new llama-cpp-python
    version fetches its own scripts.
    """
    target = converters_dir()
    if converters_ready():
        return target
    version = engine_version()
    progress(f"fetching llama.cpp's GGUF converters (llama-cpp-python {version} sdist, about 76 MB, once) ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Staged in a folder of this process's own (not core.files' one NAME.part): two preparers at once
    # (the prepare-models job and a training job's packaging) must not write into each other's copy.
    with tempfile.TemporaryDirectory(prefix="llama-cpp-sdist-", dir=target.parent) as tmp:
        sdist = _download_sdist(version, Path(tmp))
        staging = Path(tmp) / CONVERTERS_DIR_NAME
        _extract_converters(sdist, staging)
        sdist.unlink()
        (staging / CONVERTERS_MARKER).write_text(version)
        if not converters_ready():  # another process may have finished first
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    progress(f"converters ready in {target}")
    return target


def _download_sdist(version: str, directory: Path) -> Path:
    command = ["-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps", "--no-binary", ":all:"]
    run_python([*command, "--quiet", "--dest", str(directory)], "downloading the llama-cpp-python sdist")
    found = sorted(directory.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise ConversionError(f"pip downloaded no llama-cpp-python {version} sdist into {directory}")
    return found[0]


def _extract_converters(sdist: Path, target: Path) -> None:
    with tarfile.open(sdist) as tar:
        for member in tar:
            top, found, relative = member.name.partition("/vendor/llama.cpp/")
            wanted = found and "/" not in top and relative.startswith(CONVERTER_FILES) and ".." not in relative
            if not (wanted and member.isfile()):
                continue
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # None only for a member that is not a regular file, skipped above
            destination.write_bytes(source.read())
    missing = [name for name in CONVERTER_FILES[:2] if not (target / name).exists()]
    if missing:
        raise ConversionError(f"{sdist.name} has no {', '.join(missing)} under vendor/llama.cpp")


def run_python(args: list[str], what: str) -> None:
    """`python ARGS` with the vendored gguf package first on the path (then this project, for
    `-m core.gguf_tokenizer`); a failure becomes one line."""
    gguf_py = str(converters_dir() / "gguf-py")
    path = [gguf_py, _PROJECT_ROOT, os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    env["HF_HUB_OFFLINE"] = "1"  # converters read local folders; never wait on the hub
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, errors="replace", env=env)
    if proc.returncode != 0:
        raise ConversionError(f"{what} failed: {last_meaningful_line(proc.stderr or proc.stdout)}")


def run_converter(script: str, args: list[str], what: str, progress: Progress) -> None:
    """One of llama.cpp's convert scripts (fetched first if need be) with these arguments."""
    root = prepare_converters(progress)
    run_python([str(root / script), *args], what)


def last_meaningful_line(output: str) -> str:
    """The line that says why (a traceback's last line, an ERROR log), not progress bars or carets."""
    lines = [line.strip() for line in output.splitlines()]
    keep = [line for line in lines if line and "%|" not in line and not line.startswith(("INFO:", "^", "~"))]
    return keep[-1][:300] if keep else "no error output"
