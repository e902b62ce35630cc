"""The embedded engine is built for the CPU it runs on, never with AMX kernels, and a crash stays in its process."""

import os
import shutil
import signal
import subprocess

import pytest

from core import engine, engine_build
from core.backends import make_backend
from core.decoding import DecodingParams
from core.engine_process import EngineCrashed, EngineProcess, describe_engine
from core.errors import BackendUnavailable, NotFound
from core.prompting import DEFAULT_TEMPLATE, render_prompt, stop_sequences

GREEDY = DecodingParams(temperature=0.0, max_tokens=24)
LONG = DecodingParams(temperature=0.0, max_tokens=400, repeat_penalty=1.0)
PROMPT = render_prompt("How should a researcher choose baselines for a new method?")
STOP = stop_sequences(DEFAULT_TEMPLATE)
SYSTEM_INFO = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "


# ---- the build ---------------------------------------------------------------------------------


def test_the_installed_engine_reports_no_amx_and_the_native_features_of_this_cpu():
    features = engine.system_features()
    assert not engine.has_amx(features), features
    flags = set(engine_build.cpu_flags())
    for flag, feature in (("avx2", "AVX2"), ("fma", "FMA"), ("f16c", "F16C"), ("avx512f", "AVX512")):
        assert features.get(feature, False) == (flag in flags), f"{feature} should follow the CPU's {flag}"


def test_the_installed_engine_was_built_here_for_this_cpu():
    build = engine.build_info()
    assert build is not None, "make bootstrap leaves engine-build.json in the virtual environment"
    assert build["cmake_args"] == engine_build.CMAKE_ARGS and "-mno-amx-int8" in build["cmake_args"]
    assert build["cpu_flags"] == engine_build.cpu_flags()
    assert engine.missing_cpu_features(build) == []


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc to preprocess")
def test_the_build_flags_keep_amx_out_even_for_a_cpu_that_has_it():
    """What -march=native means on a Sapphire Rapids machine, preprocessed here with the build's own flags."""

    def macros(*flags):
        out = subprocess.run(["gcc", *flags, "-dM", "-E", "-"], input="", capture_output=True, text=True, check=True)
        return {line.split()[1] for line in out.stdout.splitlines()}

    plain = macros("-march=sapphirerapids")
    ours = macros(*engine_build.AMX_OFF.split(), "-march=sapphirerapids")  # the flags come first in the build
    assert "__AMX_INT8__" in plain  # the kernels ggml compiles in when this macro is defined
    assert not {m for m in ours if m.startswith("__AMX")}
    assert {"__AVX512F__", "__AVX512VNNI__", "__AVX512BF16__"} <= ours  # every other native feature stays


def test_the_build_key_changes_with_the_cpu_the_flags_and_the_compiler():
    key = engine_build.build_key("0.3.36", engine_build.CMAKE_ARGS, ["avx2", "fma"], "gcc 12")
    assert key == engine_build.build_key("0.3.36", engine_build.CMAKE_ARGS, ["avx2", "fma"], "gcc 12")
    assert key != engine_build.build_key("0.3.36", engine_build.CMAKE_ARGS, ["avx2", "avx512f", "fma"], "gcc 12")
    assert key != engine_build.build_key("0.3.36", "-DGGML_NATIVE=ON", ["avx2", "fma"], "gcc 12")
    assert key != engine_build.build_key("0.3.36", engine_build.CMAKE_ARGS, ["avx2", "fma"], "gcc 14")
    assert key != engine_build.build_key("0.3.37", engine_build.CMAKE_ARGS, ["avx2", "fma"], "gcc 12")


def test_an_engine_built_on_a_cpu_with_more_features_is_refused_before_it_loads():
    build = {"key": "x", "cpu_flags": ["avx", "avx2", "avx512f", "avx512bw", "fma", "hypervisor"]}
    with pytest.raises(BackendUnavailable, match=r"avx512bw, avx512f.*make engine"):
        engine.check_build(build, flags=["avx", "avx2", "fma"])
    engine.check_build(build, flags=["avx", "avx2", "avx512f", "avx512bw", "fma"])  # a flag like hypervisor is no ISA
    engine.check_build({}, flags=[])  # a build this project did not make is not judged


def test_system_info_is_read_feature_by_feature():
    features = engine.parse_features(SYSTEM_INFO)
    assert features["AVX2"] and features["LLAMAFILE"] and not engine.has_amx(features)
    assert engine.has_amx(engine.parse_features(SYSTEM_INFO + "AMX_INT8 = 1 | REPACK = 1 |"))
    assert not engine.has_amx(engine.parse_features(SYSTEM_INFO + "AMX_INT8 = 0 |"))


def test_an_engine_with_amx_kernels_loads_without_extra_buffer_types_and_answers(embedded_models, monkeypatch):
    import llama_cpp.llama_cpp as bindings

    monkeypatch.setattr(engine, "system_features", lambda: engine.parse_features(SYSTEM_INFO + "AMX_INT8 = 1 |"))
    with engine.load_guard():
        assert bindings.llama_model_default_params().use_extra_bufts is False
    assert bindings.llama_model_default_params().use_extra_bufts is True  # only for that load
    backend = make_backend("llamacpp")
    assert backend.generate([PROMPT], GREEDY, STOP)[0]  # loaded through the guard, with extra buffers off


def test_the_engine_report_names_its_features_in_one_line():
    line = describe_engine()
    assert line.startswith("llama.cpp engine ") and "no AMX" in line and "built for this CPU" in line


# ---- the engine in a process of its own --------------------------------------------------------


@pytest.fixture
def engine_process(embedded_models):
    proc = EngineProcess("llamacpp").start()
    yield proc
    proc.close()


def test_the_engine_process_answers_as_the_engine_does_in_process(engine_process):
    in_process = make_backend("llamacpp").generate([PROMPT], GREEDY, STOP)
    assert engine_process.generate([PROMPT], GREEDY, STOP) == in_process
    assert "".join(engine_process.stream(PROMPT, GREEDY, STOP)).strip() == in_process[0]
    assert engine_process.completion_tokens > 0


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL])
def test_a_crash_mid_answer_is_one_error_and_the_next_answer_comes_from_a_fresh_engine(engine_process, sig):
    crashed_pid = engine_process.pid
    pieces = engine_process.stream(PROMPT, LONG)
    assert next(pieces)  # the answer has begun
    os.kill(crashed_pid, sig)
    with pytest.raises(EngineCrashed, match=f"died of {sig.name}"):
        for _ in pieces:
            pass
    assert engine_process.pid is None
    assert engine_process.generate([PROMPT], GREEDY, STOP)[0]
    assert engine_process.pid not in (None, crashed_pid)


def test_an_answer_abandoned_half_way_leaves_the_engine_ready(engine_process):
    pid = engine_process.pid
    pieces = engine_process.stream(PROMPT, LONG)
    next(pieces)
    pieces.close()  # what a Streamlit rerun does to a stream in progress
    assert engine_process.generate([PROMPT], GREEDY, STOP) == make_backend("llamacpp").generate([PROMPT], GREEDY, STOP)
    assert engine_process.pid == pid  # the same engine, model still loaded


def test_an_engine_error_arrives_as_its_own_one_line_error(tmp_path):
    with pytest.raises(NotFound, match="no GGUF file"):
        EngineProcess("llamacpp", str(tmp_path / "missing.gguf")).start()
