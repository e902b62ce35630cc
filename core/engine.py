"""What the installed llama.cpp engine is, and whether it is safe to load on this CPU.

Two ways a native engine can die on a machine other than the one it was built for, both guarded here:
- built natively on a CPU with features this one lacks (an AVX512 build on an AVX2 machine): SIGILL.
  `make bootstrap` records the build's CPU flags in the virtual environment (core.engine_build); loading
  refuses with a one-line message naming `make engine` when this CPU lacks one of them;
- ggml's AMX kernels compiled in (a user's own build, an old .venv): they crash on Q4_K_M weights
  (llama.cpp #20824). Such an engine is loaded without its extra buffer types, which is where the AMX
  kernels live; the answers are the same, a little slower.

Importing llama_cpp loads the native library, which runs code compiled for the build's CPU; so this
module never imports it at module level, and the Settings page asks an engine process (core.engine_process)
for `engine_report()` rather than importing it into the app server.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.engine_build import STAMP_NAME, cpu_flags
from core.errors import BackendUnavailable

# CPU flags a native build may compile instructions for; the other /proc/cpuinfo flags (hypervisor,
# microcode workarounds, ...) do not decide whether an instruction exists.
_ISA_FLAG = re.compile(
    r"^(sse\w*|ssse3|pni|avx\w*|amx\w*|fma\w*|f16c|bmi\d|popcnt|abm|lzcnt|movbe|aes|vaes|pclmulqdq|vpclmulqdq"
    r"|sha_ni|gfni|adx|xop|cx16|rdrnd|rdseed|xsave\w*)$"
)
AMX_FEATURES = ("AMX_INT8", "AMX_TILE", "AMX_BF16")


@dataclass(frozen=True)
class EngineReport:
    version: str
    features: dict[str, bool]
    build: dict | None  # the stamp core.engine_build left, or None for a build it did not make
    extra_buffers: bool  # False: loaded without extra buffer types because AMX kernels are compiled in

    @property
    def amx(self) -> bool:
        return has_amx(self.features)

    def summary(self) -> str:
        on = [name for name, value in self.features.items() if value]
        build = f"built for this CPU (build {self.build['key']})" if self.build else "not built here"
        amx = (
            "AMX compiled in: loaded without extra buffer types (run `make engine` for a build without it)"
            if self.amx
            else "no AMX"
        )
        return f"llama.cpp engine {self.version} · {' '.join(on) or 'no CPU features reported'} · {amx} · {build}"


def build_info(prefix: Path | None = None) -> dict | None:
    """The stamp `make bootstrap` left beside the installed engine, if it built it."""
    try:
        return json.loads((Path(prefix or sys.prefix) / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def missing_cpu_features(build: dict | None, flags: list[str] | None = None) -> list[str]:
    """Instruction-set flags the build's CPU had and this one lacks (empty: safe to load)."""
    if not build or not build.get("cpu_flags"):
        return []
    present = set(cpu_flags() if flags is None else flags)
    return sorted(f for f in build["cpu_flags"] if _ISA_FLAG.match(f) and f not in present)


def check_build(build: dict | None = None, flags: list[str] | None = None) -> None:
    """Refuse, before the native library is loaded, an engine compiled for instructions this CPU lacks."""
    missing = missing_cpu_features(build_info() if build is None else build, flags)
    if missing:
        raise BackendUnavailable(
            f"the llama.cpp engine was built on a CPU with {', '.join(missing[:4])}, which this CPU lacks "
            "(loading it would crash): run `make engine` to rebuild it for this machine"
        )


def parse_features(system_info: str) -> dict[str, bool]:
    """`llama_print_system_info()` text ('CPU : SSE3 = 1 | AVX2 = 1 | ...') as {feature: on}."""
    return {name: value == "1" for name, value in re.findall(r"([A-Z][A-Z0-9_]*) = (\d+)", system_info)}


def has_amx(features: dict[str, bool]) -> bool:
    return any(features.get(name) for name in AMX_FEATURES)


def system_features() -> dict[str, bool]:
    import llama_cpp

    return parse_features(llama_cpp.llama_print_system_info().decode(errors="replace"))


@contextlib.contextmanager
def extra_buffers_disabled() -> Iterator[None]:
    """Models loaded inside get `use_extra_bufts = False`: no repacked (AMX) weight buffers.

    llama-cpp-python's `Llama` takes no argument for it; it builds its model parameters from
    `llama_model_default_params()`, so the defaults are what changes, for this load only.
    """
    import llama_cpp.llama_cpp as bindings

    original = bindings.llama_model_default_params

    def defaults():
        params = original()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = defaults
    try:
        yield
    finally:
        bindings.llama_model_default_params = original


def load_guard() -> contextlib.AbstractContextManager:
    """Wrap a model load: refuse a build for another CPU, keep AMX kernels out of a build that has them."""
    check_build()
    return extra_buffers_disabled() if has_amx(system_features()) else contextlib.nullcontext()


def engine_report() -> EngineReport:
    check_build()
    import llama_cpp

    features = system_features()
    return EngineReport(llama_cpp.__version__, features, build_info(), extra_buffers=not has_amx(features))
