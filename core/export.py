"""Export a trained LoRA adapter back into the engines: llama.cpp and Ollama.

From a training folder (adapter/ + train_config.json) this writes <train_dir>/export/: the PEFT
adapter, the adapter as GGUF (llama.cpp's lora_path), the adapter merged into its base as one
Q8_0 GGUF, an Ollama Modelfile for that GGUF with the command that registers it, and a README.
The GGUF files come from llama.cpp's own converters, taken from the llama-cpp-python sdist of the
installed version (so the files match the engine that loads them) and run as subprocesses.

Each step writes beside its target and renames, so an output is either complete or absent, and a
second export redoes nothing. Never trains, never writes into the base model or the adapter it
reads, and never emits Ollama's ADAPTER line (Ollama's own engine does not apply LoRA to Gemma 3).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core import models, workspace
from core.decoding import DecodingParams
from core.errors import BadInput, NotFound, WorkbenchError
from core.prompting import check_template, stop_sequences

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
# f32, not f16: the adapter is small (about 1.5 MB at r=8 on q_proj,v_proj of Gemma 3 270M), f32
# keeps the trained A and B exactly, and llama.cpp applies f32 LoRA tensors on every backend.
ADAPTER_OUTTYPE = "f32"
MERGED_OUTTYPE = "q8_0"


class ConversionError(WorkbenchError):
    """A converter could not turn the adapter or the merged model into GGUF (the reason in one line)."""


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    adapter: Path
    adapter_gguf: Path
    merged_gguf: Path | None
    modelfile: Path | None
    ollama_command: str | None
    readme: Path


# ---- llama.cpp's converters ------------------------------------------------------------------


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
    _run_python([*command, "--quiet", "--dest", str(directory)], "downloading the llama-cpp-python sdist")
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
            destination.write_bytes(tar.extractfile(member).read())
    missing = [name for name in CONVERTER_FILES[:2] if not (target / name).exists()]
    if missing:
        raise ConversionError(f"{sdist.name} has no {', '.join(missing)} under vendor/llama.cpp")


def _run_python(args: list[str], what: str) -> None:
    """`python ARGS` with the vendored gguf package first on the path; a failure becomes one line."""
    gguf_py = str(converters_dir() / "gguf-py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [gguf_py, os.environ.get("PYTHONPATH")]))}
    env["HF_HUB_OFFLINE"] = "1"  # converters read local folders; never wait on the hub
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, errors="replace", env=env)
    if proc.returncode != 0:
        raise ConversionError(f"{what} failed: {last_meaningful_line(proc.stderr or proc.stdout)}")


def last_meaningful_line(output: str) -> str:
    """The line that says why (a traceback's last line, an ERROR log), not progress bars or carets."""
    lines = [line.strip() for line in output.splitlines()]
    keep = [line for line in lines if line and "%|" not in line and not line.startswith(("INFO:", "^", "~"))]
    return keep[-1][:300] if keep else "no error output"


def _run_converter(script: str, args: list[str], what: str, progress: Progress) -> None:
    root = prepare_converters(progress)
    _run_python([str(root / script), *args], what)


def _check_hf_dir(path: Path, role: str) -> None:
    config = path / "config.json"
    if not path.is_dir():
        raise NotFound(f"the {role} folder {path} does not exist (converters need a local checkpoint folder)")
    if not config.exists():
        raise NotFound(f"the {role} is not a Hugging Face checkpoint folder (no {config})")
    quantization = json.loads(config.read_text()).get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?")
        raise BadInput(
            f"{config} has quantization_config (quant_method {method}), which llama.cpp's converters reject; "
            "convert from an unquantized checkpoint"
        )


# ---- conversions -----------------------------------------------------------------------------


def adapter_to_gguf(adapter_dir: Path, base_model_dir: Path, out_file: Path, progress: Progress = print) -> Path:
    """A PEFT LoRA adapter as a GGUF LoRA for llama.cpp (seconds), checked against its base's config."""
    adapter_dir, base_model_dir, out_file = Path(adapter_dir), Path(base_model_dir), Path(out_file)
    if not (adapter_dir / "adapter_config.json").exists():
        raise NotFound(f"no PEFT adapter in {adapter_dir} (no adapter_config.json)")
    _check_hf_dir(base_model_dir, "base model")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    part = out_file.with_name(out_file.name + ".part")
    args = ["--base", str(base_model_dir), "--outtype", ADAPTER_OUTTYPE, "--outfile", str(part), str(adapter_dir)]
    try:
        _run_converter("convert_lora_to_gguf.py", args, "converting the adapter to GGUF", progress)
        part.rename(out_file)
    finally:
        part.unlink(missing_ok=True)
    return out_file


def merge_adapter(base_model_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Base (unquantized, fp32) + adapter folded into one Hugging Face checkpoint (safetensors + tokenizer).

    A QLoRA adapter was trained against 4-bit weights, but it is merged into the full-precision
    base: quantizing happens once, in the GGUF conversion, not twice.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_model_dir, out_dir = Path(base_model_dir), Path(out_dir)
    _check_hf_dir(base_model_dir, "base model")
    base = AutoModelForCausalLM.from_pretrained(
        base_model_dir, dtype=torch.float32, trust_remote_code=False, use_safetensors=True
    )
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir, trust_remote_code=False)
    return models.save_checkpoint(merged, tokenizer, out_dir)


def merged_to_gguf(
    merged_dir: Path,
    out_file: Path,
    outtype: str = MERGED_OUTTYPE,
    tokenizer_from: Path | None = None,
    progress: Progress = print,
) -> Path:
    """A Hugging Face checkpoint as one GGUF (q8_0 by default).

    tokenizer_from: a GGUF of the same vocabulary whose tokenizer entries replace the converter's.
    The embedded checkpoint's tokenizer.json was rebuilt from its GGUF by transformers; without a
    tokenizer.model the converter writes it as a BPE ("gpt2") vocabulary, which decodes byte-fallback
    tokens as "<0xC2>" text and is not the SentencePiece vocabulary Ollama's Gemma 3 engine expects.
    Copying the original GGUF's entries back makes the merged file tokenize like its base.
    """
    merged_dir, out_file = Path(merged_dir), Path(out_file)
    _check_hf_dir(merged_dir, "merged model")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    part = out_file.with_name(out_file.name + ".part")
    converted = out_file.with_name(out_file.name + ".converted.part")
    args = [str(merged_dir), "--outtype", outtype, "--outfile", str(converted if tokenizer_from else part)]
    try:
        _run_converter("convert_hf_to_gguf.py", args, "converting the merged model to GGUF", progress)
        if tokenizer_from:
            script = ["-c", _COPY_TOKENIZER, str(converted), str(tokenizer_from), str(part)]
            _run_python(script, f"copying the tokenizer of {Path(tokenizer_from).name}")
        part.rename(out_file)
    finally:
        part.unlink(missing_ok=True)
        converted.unlink(missing_ok=True)
    return out_file


# Runs with the vendored gguf package: the GGUF argv[1] with every tokenizer.* entry taken from argv[2].
_COPY_TOKENIZER = """
import sys
import gguf

source, vocab, out = (gguf.GGUFReader(sys.argv[1]), gguf.GGUFReader(sys.argv[2]), sys.argv[3])
def count(reader):
    return len(reader.get_field("tokenizer.ggml.tokens").data)
if count(source) != count(vocab):
    sys.exit(f"ERROR: the vocabularies differ ({count(source)} vs {count(vocab)} tokens)")
writer = gguf.GGUFWriter(out, arch=source.get_field("general.architecture").contents(), endianess=source.endianess)
def copy(field):
    kind = field.types[0]
    sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
for field in source.fields.values():
    if not field.name.startswith(("GGUF.", "general.architecture", "tokenizer.")):
        copy(field)
for field in vocab.fields.values():
    if field.name.startswith("tokenizer."):
        copy(field)
for tensor in source.tensors:
    writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_ti_data_to_file()
for tensor in source.tensors:
    writer.write_tensor_data(tensor.data, tensor_endianess=source.endianess)
writer.close()
"""


# ---- Ollama ----------------------------------------------------------------------------------


def _modelfile_string(value: str, triple: bool = False) -> str:
    """A Modelfile value in quotes. Ollama's parser has no escapes: newlines stay literal inside the
    quotes, and a value holding a double quote needs triple quotes (as `ollama show --modelfile` writes)."""
    if '"""' in value:
        raise BadInput(f"a Modelfile value cannot contain three double quotes in a row: {value!r}")
    return f'"""{value}"""' if triple or '"' in value else f'"{value}"'


def ollama_template(prompt_template: str) -> str:
    """Our `{question}` template as an Ollama (Go) template: the question is `{{ .Prompt }}`."""
    marker = "\x00"
    literal = check_template(prompt_template).format(question=marker).split(marker)
    # In a Go template only "{{" is special; literal text keeps it as a quoted string action.
    return "{{ .Prompt }}".join(part.replace("{{", '{{ "{{" }}') for part in literal)


def modelfile_text(gguf_name: str, prompt_template: str, params: DecodingParams, stop: list[str]) -> str:
    lines = [
        "# From the QA Tuning Workbench: the fine-tuned model with its prompt template and decoding parameters.",
        f"FROM ./{gguf_name}",
        f"TEMPLATE {_modelfile_string(ollama_template(prompt_template), triple=True)}",
        f"PARAMETER temperature {params.temperature:g}",
        f"PARAMETER top_p {params.top_p:g}",
        f"PARAMETER top_k {params.top_k}",
        f"PARAMETER num_predict {params.max_tokens}",
        f"PARAMETER repeat_penalty {params.repeat_penalty:g}",
    ]
    if params.seed is not None:
        lines.append(f"PARAMETER seed {params.seed}")
    if stop:
        lines.append("# Where an answer ends. Newlines are literal: Ollama's Modelfile has no escapes.")
        lines += [f"PARAMETER stop {_modelfile_string(s)}" for s in stop]
    return "\n".join(lines) + "\n"


def write_modelfile(
    directory: Path, gguf_name: str, prompt_template: str, params: DecodingParams, stop: list[str]
) -> Path:
    path = Path(directory) / "Modelfile"
    _write_if_changed(path, modelfile_text(gguf_name, prompt_template, params, stop))
    return path


def ollama_create_command(model_name: str, directory: Path) -> str:
    """The shell command that registers the Modelfile of `directory` in Ollama as `model_name`."""
    return f"cd {shlex.quote(str(Path(directory).resolve()))} && ollama create {shlex.quote(model_name)} -f Modelfile"


def ollama_model_name(train_dir: Path) -> str:
    """A name Ollama accepts (lowercase letters, digits, - _ .), from the training folder's name."""
    name = re.sub(r"[^a-z0-9._-]+", "-", Path(train_dir).resolve().name.lower()).strip("-._")
    return name or "qa-tuned"


# ---- the export folder -----------------------------------------------------------------------


def export_training(
    train_dir: Path,
    params: DecodingParams | None = None,
    merged: bool = True,
    progress: Progress = print,
    keep_merged_hf: bool = False,
) -> ExportResult:
    """Write <train_dir>/export/ step by step, skipping every step whose output is already there.

    params: the decoding the Modelfile carries (default greedy, as evaluation's default).
    merged: also merge into the base and write the Q8_0 GGUF, Modelfile and ollama-create.txt.
    keep_merged_hf: keep the merged Hugging Face checkpoint (export/merged-hf/, as big as the base).
    """
    train_dir = Path(train_dir)
    config = _train_config(train_dir)
    base = Path(config["resolved_model"])
    out = train_dir / "export"
    out.mkdir(exist_ok=True)
    params = params or DecodingParams(temperature=0.0)

    adapter = out / "adapter"
    if not adapter.exists():
        progress("copying the PEFT adapter ...")
        _copy_tree(train_dir / "adapter", adapter)
    for name in ("train_config.json", "metrics.json"):
        if (train_dir / name).exists() and not (out / name).exists():
            _copy_file(train_dir / name, out / name)

    adapter_gguf = out / "adapter.gguf"
    if not adapter_gguf.exists():
        progress("converting the adapter to GGUF ...")
        adapter_to_gguf(train_dir / "adapter", base, adapter_gguf, progress)

    merged_gguf = modelfile = command = None
    if merged:
        merged_gguf = out / f"merged-{MERGED_OUTTYPE}.gguf"
        if not merged_gguf.exists():
            _merge_to_gguf(train_dir / "adapter", base, merged_gguf, keep_merged_hf, progress)
        stop = stop_sequences(config["prompt_template"])
        modelfile = write_modelfile(out, merged_gguf.name, config["prompt_template"], params, stop)
        command = ollama_create_command(ollama_model_name(train_dir), out)
        _write_if_changed(out / "ollama-create.txt", command + "\n")
    readme = out / "README.txt"
    _write_if_changed(readme, readme_text(train_dir, config))
    progress(f"export ready in {out}")
    return ExportResult(out, adapter, adapter_gguf, merged_gguf, modelfile, command, readme)


def _merge_to_gguf(adapter: Path, base: Path, target: Path, keep_hf: bool, progress: Progress) -> None:
    merged_hf = target.parent / "merged-hf"
    if not merged_hf.exists():
        progress("merging the adapter into the base model (fp32) ...")
        merge_adapter(base, adapter, merged_hf)
    progress(f"converting the merged model to GGUF ({MERGED_OUTTYPE}) ...")
    merged_to_gguf(merged_hf, target, MERGED_OUTTYPE, _embedded_gguf_for(base), progress)
    if not keep_hf:
        shutil.rmtree(merged_hf)


def _embedded_gguf_for(base: Path) -> Path | None:
    """The GGUF the base checkpoint was made from, when it is the embedded model's."""
    if models.is_embedded_checkpoint(base) and models.gguf_path().exists():
        return models.gguf_path()
    return None


def _train_config(train_dir: Path) -> dict:
    config_file = train_dir / "train_config.json"
    if not (train_dir / "adapter" / "adapter_config.json").exists() or not config_file.exists():
        raise NotFound(f"{train_dir} is not a finished training run (no adapter/ and train_config.json)")
    return json.loads(config_file.read_text())


FILE_NOTES = {
    "adapter": "the LoRA adapter in PEFT format: PeftModel.from_pretrained(base_model, 'adapter')",
    "adapter.gguf": "the same adapter as GGUF (f32) for llama.cpp, applied to its base model's GGUF",
    f"merged-{MERGED_OUTTYPE}.gguf": "the adapter merged into the base model: one GGUF for llama.cpp or Ollama",
    "Modelfile": "Ollama's recipe for the merged GGUF: prompt template, decoding parameters, stop sequences",
    "ollama-create.txt": "the command that registers it in Ollama",
    "train_config.json": "the training settings; resolved_model is the base checkpoint",
    "metrics.json": "the training figures (losses)",
}


def readme_text(train_dir: Path, config: dict) -> str:
    """What each file of <train_dir>/export/ is, and how to load it (only the files that are there)."""
    out = train_dir / "export"
    names = [name for name in FILE_NOTES if (out / name).exists()]
    width = max(map(len, names))
    base_gguf = str(_embedded_gguf_for(Path(config["resolved_model"])) or "<the base model's GGUF>")
    template, stop = config["prompt_template"], stop_sequences(config["prompt_template"])
    lines = [
        f"Export of {train_dir.name}: {config.get('method')} r={config.get('lora_r')} on {config['resolved_model']}",
        "",
        *(f"{name.ljust(width)}  {FILE_NOTES[name]}" for name in names),
        "",
        "llama.cpp (llama-cpp-python), in this folder:",
        "    from llama_cpp import Llama",
        f"    llm = Llama(model_path={base_gguf!r}, lora_path='adapter.gguf')",
        f"    prompt = {template!r}.format(question='...')",
        f"    llm.create_completion(prompt, temperature=0, max_tokens=128, stop={stop!r})['choices'][0]['text']",
    ]
    if (out / "Modelfile").exists():
        lines += [
            f"or the merged model alone: Llama(model_path='merged-{MERGED_OUTTYPE}.gguf'), same prompt.",
            "",
            "Ollama (the Modelfile puts the question into the prompt template):",
            f"    {(out / 'ollama-create.txt').read_text().strip()}",
            f"    ollama run {ollama_model_name(train_dir)} 'your question'",
            "The Modelfile has no ADAPTER line: Ollama's own engine does not apply LoRA adapters to Gemma 3.",
        ]
    return "\n".join(lines) + "\n"


def zip_export(train_dir: Path) -> Path:
    """<train_dir>/<name>-export.zip of the export folder (without a kept merged-hf/ checkpoint), made
    again only when a file in it changed."""
    train_dir = Path(train_dir)
    source = train_dir / "export"
    if not source.is_dir():
        raise NotFound(f"{train_dir} has not been exported yet (no export/ folder)")
    target = train_dir / f"{train_dir.name}-export.zip"
    files = sorted(
        p for p in source.rglob("*") if p.is_file() and not p.name.endswith(".part") and "merged-hf" not in p.parts
    )
    newest = max([source.stat().st_mtime, *(p.stat().st_mtime for p in files)])
    if target.exists() and target.stat().st_mtime >= newest:
        return target
    part = target.with_name(target.name + ".part")
    with zipfile.ZipFile(part, "w") as archive:
        for path in files:
            # Quantized weights barely compress; deflating 300 MB would cost ten seconds for nothing.
            compression = zipfile.ZIP_STORED if path.suffix == ".gguf" else zipfile.ZIP_DEFLATED
            archive.write(path, f"{train_dir.name}/{path.relative_to(source)}", compress_type=compression)
    part.rename(target)
    return target


# ---- small file helpers ----------------------------------------------------------------------


def _copy_tree(source: Path, target: Path) -> None:
    part = target.with_name(target.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    shutil.copytree(source, part)
    part.rename(target)


def _copy_file(source: Path, target: Path) -> None:
    part = target.with_name(target.name + ".part")
    shutil.copy2(source, part)
    part.rename(target)


def _write_if_changed(path: Path, text: str) -> None:
    """Write only new content, so a repeated export leaves the file (and its mtime) alone."""
    if path.exists() and path.read_text() == text:
        return
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    part.replace(path)
