"""Build and install the embedded llama.cpp engine (llama-cpp-python) for the CPU it runs on, minus AMX.

Run by `make bootstrap` (a no-op when the installed engine already matches) and `make engine` (always
rebuilds). It runs before the project's requirements are installed, so it uses the standard library (and
core.files, which needs no more) only and is started as `python -m core.engine_build`, not through the
workbench CLI.

Why a build step of its own:
- llama-cpp-python compiles ggml with `-march=native`. On CPUs with AMX (Sapphire Rapids and later) that
  compiles ggml's AMX kernels in, and they crash on Q4_K_M weights (llama.cpp #20824). `-mno-amx-*` after
  `-march=native` keeps every other native feature (AVX512, VNNI, BF16, repacking); GCC and Clang let an
  explicit `-mno-…` win over `-march` whatever the order.
- A native build is right only for the CPU it was built on, and pip's wheel cache does not key on
  CMAKE_ARGS or the CPU. So the wheel is built with pip's cache off and kept in a cache of our own, keyed
  by the engine version, the build flags, the CPU's flags and the compiler: another CPU or other flags mean
  another build, never a reused one.
- The install leaves `engine-build.json` in the virtual environment; `core.engine` reads it at load and
  refuses an engine built for a CPU with features this one lacks (it would die of SIGILL).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from core import files

PACKAGE = "llama_cpp_python"
REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"
AMX_OFF = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_ARGS = f"-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='{AMX_OFF}' -DCMAKE_CXX_FLAGS='{AMX_OFF}'"
STAMP_NAME = "engine-build.json"


def pinned_version(requirements: Path = REQUIREMENTS) -> str:
    match = re.search(rf"^{PACKAGE}==(\S+)", requirements.read_text(), re.MULTILINE | re.IGNORECASE)
    if not match:
        raise SystemExit(f"{requirements} pins no {PACKAGE} version")
    return match.group(1)


def cpu_flags() -> list[str]:
    """The CPU's feature flags as the kernel reports them (empty where /proc/cpuinfo has none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return sorted(set(match.group(1).split())) if match else []


def compiler() -> str:
    cc = os.environ.get("CC", "cc")
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return cc
    return out.splitlines()[0] if out else cc


def build_key(version: str, cmake_args: str, flags: list[str], compiler_id: str) -> str:
    text = "\n".join([version, cmake_args, " ".join(flags), compiler_id])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stamp_path(venv: Path) -> Path:
    return venv / STAMP_NAME


def installed_key(venv: Path) -> str | None:
    try:
        return json.loads(stamp_path(venv).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def _build_wheel(pip: list[str], version: str, target: Path) -> Path:
    """Compile the wheel (3-10 minutes) into `target`, which appears only once the build succeeded."""
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "FORCE_CMAKE": "1"}
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    target.parent.mkdir(parents=True, exist_ok=True)
    with files.replacing(target) as part:
        subprocess.run(
            [*pip, "wheel", "--no-deps", "--no-cache-dir", "--no-binary", PACKAGE, "-w", part, f"{PACKAGE}=={version}"],
            env=env,
            check=True,
        )
    return target


def ensure_engine(venv: Path, cache: Path, rebuild: bool = False) -> str:
    """Install the engine into `venv` unless the installed one matches this CPU and these flags."""
    version, flags, compiler_id = pinned_version(), cpu_flags(), compiler()
    key = build_key(version, CMAKE_ARGS, flags, compiler_id)
    if not rebuild and installed_key(venv) == key:
        return f"llama.cpp engine {version} is built for this CPU (build {key})"
    wheels = cache / key
    if rebuild or not list(wheels.glob("*.whl")):
        print(f">> building llama-cpp-python {version} for this CPU without AMX (3-10 minutes, once per CPU)")
        _build_wheel([str(venv / "bin" / "python"), "-m", "pip"], version, wheels)
    wheel = sorted(wheels.glob("*.whl"))[-1]
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
        check=True,
    )
    stamp = {
        "key": key,
        "version": version,
        "cmake_args": CMAKE_ARGS,
        "cpu_flags": flags,
        "compiler": compiler_id,
        "wheel": str(wheel),
        "installed_at": time.time(),
    }
    files.write_json(stamp_path(venv), stamp)
    return f"installed llama.cpp engine {version} built for this CPU (build {key})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.engine_build", description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path(sys.prefix))
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("WORKBENCH_ENGINE_CACHE", Path.home() / ".cache" / "qa-workbench" / "engine")),
    )
    parser.add_argument("--rebuild", action="store_true", help="build again even if a matching engine exists")
    args = parser.parse_args(argv)
    print(ensure_engine(args.venv.resolve(), args.cache, args.rebuild))
    return 0


if __name__ == "__main__":
    sys.exit(main())
