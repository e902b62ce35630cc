"""core.gguf_tokenizer: a GGUF keeps its weights and settings and takes another GGUF's tokenizer.

On GGUFs of three tokens and one 2x3 tensor, written with the gguf package, so each test takes
well under a second.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from core import gguf_tokenizer  # noqa: E402  (needs gguf, skipped above without it)

WEIGHTS = np.arange(6, dtype=np.float32).reshape(2, 3)


def write_gguf(path: Path, tokens: list[str], tokenizer_model: str, context_length: int) -> Path:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_context_length(context_length)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_tensor("token_embd.weight", WEIGHTS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(str(path))
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}


def test_the_output_has_the_vocab_files_tokenizer_and_the_source_files_rest(tmp_path):
    source = write_gguf(tmp_path / "merged.gguf", ["a", "b", "c"], "gpt2", context_length=256)
    vocab = write_gguf(tmp_path / "base.gguf", ["<s>", "x", "y"], "llama", context_length=32768)

    assert gguf_tokenizer.main([str(source), str(vocab), str(tmp_path / "out.gguf")]) == 0

    out = fields(tmp_path / "out.gguf")
    assert out["tokenizer.ggml.model"] == "llama"
    assert out["tokenizer.ggml.tokens"] == ["<s>", "x", "y"]
    assert out["llama.context_length"] == 256  # the source's own settings stay
    assert out["general.architecture"] == "llama"
    (tensor,) = gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors
    assert tensor.name == "token_embd.weight"
    np.testing.assert_array_equal(np.asarray(tensor.data).reshape(2, 3), WEIGHTS)
    assert fields(source)["tokenizer.ggml.model"] == "gpt2"  # its inputs are left as they were


def test_vocabularies_of_different_sizes_are_refused_in_one_line(tmp_path):
    source = write_gguf(tmp_path / "merged.gguf", ["a", "b", "c"], "gpt2", context_length=256)
    vocab = write_gguf(tmp_path / "other.gguf", ["a", "b"], "llama", context_length=256)

    # run as core.packaging runs it: a module of its own, in a subprocess
    proc = subprocess.run(
        [sys.executable, "-m", "core.gguf_tokenizer", str(source), str(vocab), str(tmp_path / "out.gguf")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "ERROR: the vocabularies differ (3 vs 2 tokens)"
    assert not (tmp_path / "out.gguf").exists()
