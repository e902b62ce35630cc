"""Packages a trained LoRA adapter for llama.cpp and Ollama.

From a training folder (adapter/ + train_config.json) this writes <train_dir>/export/ (the folder
keeps that name: users have such folders): the PEFT adapter, the adapter as GGUF (llama.cpp's
lora_path), the adapter merged into its base as one Q8_0 GGUF, an Ollama Modelfile for that GGUF
with the command that registers it, and a README. The GGUF files come from llama.cpp's own
converters (core.converters), run as subprocesses.

Each step writes beside its target and renames (core.files), so an output is either complete or
absent, and a second packaging redoes nothing. Never trains, never writes into the base model or the
adapter it reads, and never emits Ollama's ADAPTER line (Ollama's own engine does not apply LoRA to Gemma 3).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core import files, models
from core.converters import run_converter, run_python
from core.decoding import DecodingParams
from core.errors import BadInput, NotFound
from core.prompting import check_template, stop_sequences
from core.train_dir import TrainDir

Progress = Callable[[str], None]

# f32, not f16: the adapter is small (about 1.5 MB at r=8 on q_proj,v_proj of Gemma 3 270M), f32
# keeps the trained A and B exactly, and llama.cpp applies f32 LoRA tensors on every backend.
ADAPTER_OUTTYPE = "f32"
MERGED_OUTTYPE = "q8_0"


@dataclass(frozen=True)
class PackageResult:
    directory: Path
    adapter: Path
    adapter_gguf: Path
    merged_gguf: Path | None
    modelfile: Path | None
    ollama_command: str | None
    readme: Path


# ---- conversions -----------------------------------------------------------------------------


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


def adapter_to_gguf(adapter_dir: Path, base_model_dir: Path, out_file: Path, progress: Progress = print) -> Path:
    """A PEFT LoRA adapter as a GGUF LoRA for llama.cpp (seconds), checked against its base's config."""
    adapter_dir, base_model_dir, out_file = Path(adapter_dir), Path(base_model_dir), Path(out_file)
    if not (adapter_dir / "adapter_config.json").exists():
        raise NotFound(f"no PEFT adapter in {adapter_dir} (no adapter_config.json)")
    _check_hf_dir(base_model_dir, "base model")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with files.replacing(out_file) as part:
        args = ["--base", str(base_model_dir), "--outtype", ADAPTER_OUTTYPE, "--outfile", str(part), str(adapter_dir)]
        run_converter("convert_lora_to_gguf.py", args, "converting the adapter to GGUF", progress)
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
    with files.replacing(out_file) as part:
        if not tokenizer_from:
            _convert_hf(merged_dir, outtype, part, progress)
            return out_file
        converted = out_file.with_name(out_file.name + ".converted.part")  # the converter's own tokenizer
        try:
            _convert_hf(merged_dir, outtype, converted, progress)
            copy = ["-m", "core.gguf_tokenizer", str(converted), str(tokenizer_from), str(part)]
            run_python(copy, f"copying the tokenizer of {Path(tokenizer_from).name}")
        finally:
            converted.unlink(missing_ok=True)
    return out_file


def _convert_hf(merged_dir: Path, outtype: str, out_file: Path, progress: Progress) -> None:
    args = [str(merged_dir), "--outtype", outtype, "--outfile", str(out_file)]
    run_converter("convert_hf_to_gguf.py", args, "converting the merged model to GGUF", progress)


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


# ---- the package: <train_dir>/export/ ---------------------------------------------------------


def package_training(
    train_dir: Path,
    params: DecodingParams | None = None,
    merged: bool = True,
    progress: Progress = print,
    keep_merged_hf: bool = False,
) -> PackageResult:
    """Write <train_dir>/export/ step by step, skipping every step whose output is already there.

    params: the decoding the Modelfile carries (default greedy, as evaluation's default).
    merged: also merge into the base and write the Q8_0 GGUF, Modelfile and ollama-create.txt.
    keep_merged_hf: keep the merged Hugging Face checkpoint (export/merged-hf/, as big as the base).
    """
    train_dir, run = Path(train_dir), TrainDir(train_dir)
    config = run.settings()
    base = Path(config["resolved_model"])
    out = run.export
    out.mkdir(exist_ok=True)
    params = params or DecodingParams(temperature=0.0)

    adapter = out / "adapter"
    if not adapter.exists():
        progress("copying the PEFT adapter ...")
        _copy_tree(run.adapter, adapter)
    for source in (run.train_config, run.metrics):
        if source.exists() and not (out / source.name).exists():
            _copy_file(source, out / source.name)

    adapter_gguf = run.gguf_adapter
    if not adapter_gguf.exists():
        progress("converting the adapter to GGUF ...")
        adapter_to_gguf(run.adapter, base, adapter_gguf, progress)

    merged_gguf = modelfile = command = None
    if merged:
        merged_gguf = out / f"merged-{MERGED_OUTTYPE}.gguf"
        if not merged_gguf.exists():
            _merge_to_gguf(run.adapter, base, merged_gguf, keep_merged_hf, progress)
        stop = stop_sequences(config["prompt_template"])
        modelfile = write_modelfile(out, merged_gguf.name, config["prompt_template"], params, stop)
        command = ollama_create_command(ollama_model_name(train_dir), out)
        _write_if_changed(out / "ollama-create.txt", command + "\n")
    readme = out / "README.txt"
    _write_if_changed(readme, readme_text(train_dir, config))
    progress(f"export ready in {out}")
    return PackageResult(out, adapter, adapter_gguf, merged_gguf, modelfile, command, readme)


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
    out = TrainDir(train_dir).export
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


def zip_package(train_dir: Path) -> Path:
    """<train_dir>/<name>-export.zip of the export folder (without a kept merged-hf/ checkpoint), made
    again only when a file in it changed."""
    train_dir = Path(train_dir)
    source = TrainDir(train_dir).export
    if not source.is_dir():
        raise NotFound(f"{train_dir} has not been exported yet (no export/ folder)")
    target = train_dir / f"{train_dir.name}-export.zip"
    members = sorted(
        p for p in source.rglob("*") if p.is_file() and not p.name.endswith(".part") and "merged-hf" not in p.parts
    )
    newest = max([source.stat().st_mtime, *(p.stat().st_mtime for p in members)])
    if target.exists() and target.stat().st_mtime >= newest:
        return target
    with files.replacing(target) as part, zipfile.ZipFile(part, "w") as archive:
        for path in members:
            # Quantized weights barely compress; deflating 300 MB would cost ten seconds for nothing.
            compression = zipfile.ZIP_STORED if path.suffix == ".gguf" else zipfile.ZIP_DEFLATED
            archive.write(path, f"{train_dir.name}/{path.relative_to(source)}", compress_type=compression)
    return target


# ---- small file helpers ----------------------------------------------------------------------


def _copy_tree(source: Path, target: Path) -> None:
    with files.replacing(target) as part:
        shutil.copytree(source, part)


def _copy_file(source: Path, target: Path) -> None:
    with files.replacing(target) as part:
        shutil.copy2(source, part)


def _write_if_changed(path: Path, text: str) -> None:
    """Write only new content, so a repeated packaging leaves the file (and its mtime) alone."""
    if path.exists() and path.read_text() == text:
        return
    files.write_text(path, text)
