"""Packaging: a trained adapter back into llama.cpp and Ollama (core.packaging).

The fast tests pin the Modelfile as Ollama reads it and the command that registers it. The slow
ones build a LoRA adapter for the embedded Gemma 3 270M without training (seeded random B
matrices, strong enough to change greedy answers), export it, and check that transformers with
the PEFT adapter, llama.cpp with the GGUF adapter and llama.cpp with the merged GGUF answer
alike, and unlike the base model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from core import converters, dataset, packaging
from core.decoding import DecodingParams
from core.errors import BadInput, NotFound
from core.prompting import DEFAULT_TEMPLATE, render_prompt, stop_sequences
from core.train_config import TrainConfig

LORA_B_SCALE = 0.07  # std of the random B entries: every answer changes, few turn to noise (measured)
GREEDY = DecodingParams(temperature=0.0, max_tokens=24, repeat_penalty=1.0)


# ---- the Modelfile, as Ollama reads it -------------------------------------------------------


def ollama_parse(text: str) -> list[tuple[str, str]]:
    """Ollama's Modelfile parser (parser/parser.go, ParseFile), ported: a list of (command, value).

    No escapes exist: a value ends at a newline once its quotes are balanced, so newlines may sit
    inside quotes, and spaces never end a value.
    """

    def unquote(s: str) -> tuple[str, bool]:
        if s.startswith('"""'):
            return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
        if s.startswith('"'):
            return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
        return s, True

    commands, state, buffer, name = [], "nil", "", ""
    for ch in text + "\n":
        if state == "nil" and ch == "#":
            state = "comment"
        elif state == "nil" and not ch.isspace():
            state, buffer = "name", ch
        elif state == "comment" and ch in "\r\n":
            state = "nil"
        elif state == "name" and ch.isalpha():
            buffer += ch
        elif state == "name" and ch in " \t":
            name, buffer = buffer.lower(), ""
            state = "parameter" if name == "parameter" else "value"
        elif state == "parameter" and (ch.isalnum() or ch == "_"):
            buffer += ch
        elif state == "parameter" and ch in " \t":
            name, buffer, state = buffer, "", "value"
        elif state == "value" and ch in "\r\n":
            value, ok = unquote(buffer.strip())
            if ok:
                commands.append((name, value))
                state, buffer = "nil", ""
            else:
                buffer += ch
        elif state == "value":
            buffer += ch
        elif state in ("name", "parameter"):
            raise ValueError(f"Ollama would refuse this Modelfile near {buffer + ch!r}")
    if state != "nil":
        raise ValueError("Ollama would refuse this Modelfile: unexpected end")
    return commands


def test_modelfile_carries_the_template_the_decoding_and_the_stops(tmp_path):
    params = DecodingParams(temperature=0.2, top_p=0.8, top_k=30, max_tokens=64, repeat_penalty=1.05, seed=7)
    path = packaging.write_modelfile(tmp_path, "merged-q8_0.gguf", DEFAULT_TEMPLATE, params, stop_sequences())

    assert path == tmp_path / "Modelfile"
    assert ollama_parse(path.read_text()) == [
        ("from", "./merged-q8_0.gguf"),
        ("template", "Question: {{ .Prompt }}\nAnswer:"),
        ("temperature", "0.2"),
        ("top_p", "0.8"),
        ("top_k", "30"),
        ("num_predict", "64"),
        ("repeat_penalty", "1.05"),
        ("seed", "7"),
        ("stop", "\n\n"),
        ("stop", "\nQuestion:"),
    ]
    # Newlines are written as they are: Ollama's parser knows no backslash escapes.
    assert 'PARAMETER stop "\n\n"\n' in path.read_text()


def test_modelfile_values_with_quotes_spaces_and_braces_survive_the_parser(tmp_path):
    template = 'Say "{question}" back\t exactly, even {{{{this}}}}:'
    stops = ['"', " end ", "\n\t\n"]
    text = packaging.modelfile_text("m.gguf", template, DecodingParams(seed=None), stops)

    parsed = ollama_parse(text)
    assert ("template", 'Say "{{ .Prompt }}" back\t exactly, even {{ "{{" }}this}}:') in parsed
    assert [value for name, value in parsed if name == "stop"] == stops
    assert "seed" not in dict(parsed)  # no seed: Ollama draws a fresh one per request
    with pytest.raises(BadInput, match="three double quotes"):
        packaging.modelfile_text("m.gguf", DEFAULT_TEMPLATE, GREEDY, ['"""'])


def test_the_create_command_is_copy_pasteable(tmp_path):
    folder = tmp_path / "run 7" / "export"
    assert packaging.ollama_create_command("qa-run-7", folder) == (
        f"cd '{folder.resolve()}' && ollama create qa-run-7 -f Modelfile"
    )
    assert packaging.ollama_model_name(Path("/x/Train 12 (Gemma)!")) == "train-12-gemma"


def test_a_base_checkpoint_converted_from_gguf_is_refused_with_the_fix(tmp_path):
    """transformers keeps quantization_config={quant_method: gguf}; llama.cpp's converters reject it."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gguf"}}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")

    with pytest.raises(BadInput, match="quant_method gguf.*unquantized") as caught:
        packaging.adapter_to_gguf(adapter, base, tmp_path / "a.gguf")
    assert "\n" not in str(caught.value)


# ---- a real adapter for the embedded Gemma 3 270M ----------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, embedded_models) -> Path:
    """LoRA r=8 on q_proj,v_proj with seeded random B (PEFT starts B at zero, i.e. no change at all)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(embedded_models.hf_checkpoint_dir(), dtype=torch.float32)
    torch.manual_seed(0)  # the A matrices
    model = peft.get_peft_model(
        base, peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * LORA_B_SCALE)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(path)
    return path


def make_train_dir(directory: Path, adapter: Path, base: Path) -> Path:
    """What core.training leaves behind: adapter/, train_config.json (+ resolved_model), metrics.json."""
    shutil.copytree(adapter, directory / "adapter")
    config = TrainConfig(dataset="starter", method="lora").to_dict()
    (directory / "train_config.json").write_text(json.dumps({**config, "resolved_model": str(base)}))
    (directory / "metrics.json").write_text(json.dumps({"steps": 0, "train_losses": []}))
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, adapter_dir, embedded_models):
    train_dir = make_train_dir(tmp_path_factory.mktemp("train-7"), adapter_dir, embedded_models.hf_checkpoint_dir())
    started = time.monotonic()
    result = packaging.package_training(train_dir, progress=lambda line: print(f"  {line}"))
    seconds = time.monotonic() - started
    sizes = {p.name: round(p.stat().st_size / 1e6, 1) for p in result.directory.iterdir() if p.is_file()}
    print(f"\nexport took {seconds:.1f} s; MB: {sizes}")
    return result


def test_export_writes_every_file_and_a_second_call_redoes_nothing(exported):
    folder = exported.directory
    assert sorted(p.name for p in folder.iterdir()) == [
        "Modelfile",
        "README.txt",
        "adapter",
        "adapter.gguf",
        "merged-q8_0.gguf",
        "metrics.json",
        "ollama-create.txt",
        "train_config.json",
    ]
    assert (folder / "adapter" / "adapter_model.safetensors").exists()
    assert ollama_parse(exported.modelfile.read_text())[0] == ("from", "./merged-q8_0.gguf")
    assert (folder / "ollama-create.txt").read_text().strip() == exported.ollama_command
    assert "lora_path='adapter.gguf'" in exported.readme.read_text()

    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    started = time.monotonic()
    again = packaging.package_training(folder.parent, progress=lambda line: None)
    assert again == exported
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before
    assert time.monotonic() - started < 5

    archive = packaging.zip_package(folder.parent)
    assert archive.stat().st_size > (folder / "merged-q8_0.gguf").stat().st_size
    assert packaging.zip_package(folder.parent).stat().st_mtime_ns == archive.stat().st_mtime_ns  # not zipped again


def test_a_failing_converter_gives_one_line(tmp_path, adapter_dir, tiny_llama):
    """An adapter for Gemma 3 on a 2-layer Llama base: the converter cannot place layer 10's tensors."""
    train_dir = make_train_dir(tmp_path / "wrong-base", adapter_dir, tiny_llama)

    with pytest.raises(converters.ConversionError) as caught:
        packaging.package_training(train_dir, progress=lambda line: None)
    message = str(caught.value)
    assert message.startswith("converting the adapter to GGUF failed: ") and "Can not map tensor" in message
    assert "\n" not in message
    assert not list((train_dir / "export").glob("*.gguf*"))  # nothing half-written is left


def test_a_missing_base_is_named(tmp_path, adapter_dir):
    train_dir = make_train_dir(tmp_path / "gone", adapter_dir, tmp_path / "deleted-base")
    with pytest.raises(NotFound, match="deleted-base"):
        packaging.package_training(train_dir, progress=lambda line: None)


# ---- the acceptance test: the same answers in every engine ------------------------------------


def leading_share(a: list[int], b: list[int]) -> float:
    """How much of two greedy answers agrees before their first different token."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), len(b), 1)


Texts = list[tuple[list[int], int]]  # token ids, and where the answer starts


def next_token_choices_hf(model_dir: Path, adapter: Path | None, texts: Texts) -> list[list[int]]:
    """transformers' greedy choice for each answer token, given everything before it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.inference_mode():
        # logits only where they predict an answer token: 262k-token rows are the costly part
        outputs = [model(torch.tensor([ids]), logits_to_keep=len(ids) - start) for ids, start in texts]
    return [out.logits[0, :-1].argmax(-1).tolist() for out in outputs]


def next_token_choices_llamacpp(gguf: Path, lora: Path | None, texts: Texts) -> list[list[int]]:
    """llama.cpp's greedy choice for each answer token, given everything before it."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=256, logits_all=True, verbose=False)
    choices = []
    for ids, start in texts:
        llm.reset()
        llm.eval(ids)
        choices.append(llm.scores[start : len(ids) - 1].argmax(-1).tolist())
    return choices


def test_llamacpp_with_the_gguf_adapter_answers_like_transformers_with_peft(starter, exported, adapter_dir):
    """The issue's acceptance test, on 8 starter test questions answered greedily (24 tokens, no stops).

    Free-running answers part for good at the first near-tie, and the llama.cpp base is the Q4_K_M
    GGUF (its matmuls also quantize activations) while transformers runs its fp32 dequantization:
    even the base model gives the same whole answer in both engines on only 3 of 8 questions. So
    whole answers only show that the adapter changes them (printed: how many are equal, and the
    share of leading tokens that agree). The tight check is token by token: every engine reads the
    same text (question + transformers' tuned answer) and picks each next token; near-ties then
    cost one token each instead of the rest of the answer.
    """
    from transformers import AutoTokenizer

    from core.backends.hf import TransformersBackend
    from core.backends.llamacpp import LlamaCppBackend
    from core.models import gguf_path, hf_checkpoint_dir

    prompts = [render_prompt(p.question) for p in dataset.select_pairs(starter, "starter", "test")[:8]]
    answers = {
        "hf base": TransformersBackend().generate(prompts, GREEDY),
        "hf + peft adapter": TransformersBackend(adapter=str(adapter_dir)).generate(prompts, GREEDY),
        "llama.cpp base": LlamaCppBackend().generate(prompts, GREEDY),
        "llama.cpp + gguf adapter": LlamaCppBackend(lora_path=str(exported.adapter_gguf)).generate(prompts, GREEDY),
        "llama.cpp merged q8_0": LlamaCppBackend(str(exported.merged_gguf)).generate(prompts, GREEDY),
    }
    tokenizer = AutoTokenizer.from_pretrained(hf_checkpoint_dir())
    tokens = {name: [tokenizer(a, add_special_tokens=False)["input_ids"] for a in got] for name, got in answers.items()}

    def compare(a: str, b: str) -> tuple[int, float]:
        same = sum(x == y for x, y in zip(answers[a], answers[b]))
        return same, sum(map(leading_share, tokens[a], tokens[b])) / len(prompts)

    figures = {
        (a, b): compare(a, b)
        for a, b in [
            ("hf base", "hf + peft adapter"),
            ("llama.cpp base", "llama.cpp + gguf adapter"),
            ("hf base", "llama.cpp base"),
            ("hf + peft adapter", "llama.cpp + gguf adapter"),
            ("llama.cpp + gguf adapter", "llama.cpp merged q8_0"),
        ]
    }
    for (a, b), (same, share) in figures.items():
        print(f"{a:>24} vs {b:<24}: {same}/8 answers equal, leading tokens agree {share:.0%}")

    texts = [  # the last prompt token is the first whose next-token choice is an answer token
        (tokenizer(p + " " + a)["input_ids"], len(tokenizer(p)["input_ids"]) - 1)
        for p, a in zip(prompts, answers["hf + peft adapter"])
    ]
    choices = {
        "hf + peft adapter": next_token_choices_hf(hf_checkpoint_dir(), adapter_dir, texts),
        "llama.cpp base": next_token_choices_llamacpp(gguf_path(), None, texts),
        "llama.cpp + gguf adapter": next_token_choices_llamacpp(gguf_path(), exported.adapter_gguf, texts),
        "llama.cpp merged q8_0": next_token_choices_llamacpp(exported.merged_gguf, None, texts),
    }

    def agreement(a: str, b: str) -> float:
        pairs = [(x, y) for c, d in zip(choices[a], choices[b]) for x, y in zip(c, d)]
        return sum(x == y for x, y in pairs) / len(pairs)

    tight = {
        (a, b): agreement(a, b)
        for a, b in [
            ("hf + peft adapter", "llama.cpp + gguf adapter"),
            ("hf + peft adapter", "llama.cpp base"),
            ("llama.cpp + gguf adapter", "llama.cpp merged q8_0"),
        ]
    }
    for (a, b), share in tight.items():
        print(f"{a:>24} vs {b:<24}: next-token choices agree {share:.0%}")

    # Measured on a 2-core CPU: 0/8 answers as before in both engines; next-token choices agree 96%
    # (GGUF adapter vs PEFT), 95% (merged vs GGUF adapter) and 67% (llama.cpp without the adapter).
    assert figures[("hf base", "hf + peft adapter")][0] <= 2  # the adapter changes the answers ...
    assert figures[("llama.cpp base", "llama.cpp + gguf adapter")][0] <= 2  # ... in both engines
    assert tight[("hf + peft adapter", "llama.cpp + gguf adapter")] >= 0.9  # ... and the same way
    assert tight[("llama.cpp + gguf adapter", "llama.cpp merged q8_0")] >= 0.9  # merged or not
    assert tight[("hf + peft adapter", "llama.cpp base")] <= 0.85  # the check can tell adapter from none


def test_only_the_converters_are_taken_from_the_sdist(tmp_path):
    """From llama-cpp-python's 76 MB sdist: the two scripts, their conversion/ and gguf-py/gguf/ packages."""
    import io
    import tarfile

    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    names = [
        "convert_lora_to_gguf.py",
        "convert_hf_to_gguf.py",
        "conversion/gemma.py",
        "gguf-py/gguf/gguf_writer.py",
        "models/templates/x.jinja",
        "models/ggml-vocab-llama.gguf",  # tokenizer test vocabularies: not needed
        "src/llama.cpp",
        "gguf-py/tests/test_quants.py",
    ]
    with tarfile.open(sdist, "w:gz") as tar:
        git_copy = "llama_cpp_python-9.9.9/.git/modules/vendor/llama.cpp/convert_hf_to_gguf.py"  # not the tree
        for name in [*(f"llama_cpp_python-9.9.9/vendor/llama.cpp/{n}" for n in names), git_copy]:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"#"))

    converters._extract_converters(sdist, tmp_path / "out")
    kept = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert kept == sorted(names[:5])
