"""Give a GGUF the tokenizer of another GGUF of the same vocabulary:
`python -m core.gguf_tokenizer SOURCE VOCAB OUT`.

Why: the merged checkpoint's tokenizer.json was rebuilt from the embedded GGUF by transformers, and
without a tokenizer.model llama.cpp's converter writes it as a BPE ("gpt2") vocabulary, which is not
the SentencePiece vocabulary Ollama's Gemma 3 engine expects. Copying the original GGUF's tokenizer.*
entries back makes the merged file tokenize like its base (core.packaging runs this).

It runs in a converter's subprocess (core.converters.run_python) with llama.cpp's vendored gguf
package first on the path, which writes the GGUF versions the engine reads; so it imports nothing of
core but itself, and never changes SOURCE or VOCAB.
"""

from __future__ import annotations

import sys

import gguf

TOKENIZER_PREFIX = "tokenizer."
# The writer sets these itself (GGUF.* are the reader's header fields, the architecture is its argument).
_WRITER_OWN = ("GGUF.", "general.architecture")


def token_count(reader: gguf.GGUFReader) -> int:
    return len(_field(reader, "tokenizer.ggml.tokens").data)


def _field(reader: gguf.GGUFReader, name: str) -> gguf.ReaderField:
    field = reader.get_field(name)
    if field is None:
        raise ValueError(f"{reader.data.filename} has no {name} entry")
    return field


def copy_tokenizer(source_path: str, vocab_path: str, out_path: str) -> None:
    """Write `out_path`: the GGUF `source_path` with every tokenizer.* entry taken from `vocab_path`.

    Raises ValueError when the two vocabularies differ in size (the token ids would not match)."""
    source, vocab = gguf.GGUFReader(source_path), gguf.GGUFReader(vocab_path)
    if token_count(source) != token_count(vocab):
        raise ValueError(f"the vocabularies differ ({token_count(source)} vs {token_count(vocab)} tokens)")
    arch = _field(source, "general.architecture").contents()
    writer = gguf.GGUFWriter(out_path, arch=arch, endianess=source.endianess)

    def copy(field) -> None:
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)

    for field in source.fields.values():
        if not field.name.startswith((*_WRITER_OWN, TOKENIZER_PREFIX)):
            copy(field)
    for field in vocab.fields.values():
        if field.name.startswith(TOKENIZER_PREFIX):
            copy(field)
    for tensor in source.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in source.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=source.endianess)
    writer.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m core.gguf_tokenizer SOURCE VOCAB OUT", file=sys.stderr)
        return 2
    try:
        copy_tokenizer(*args)
    except ValueError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)  # core.converters reports this last line
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
