"""The model a run trains: the base (4-bit NF4 for qlora) with fresh LoRA adapters, and the tokenizer.

Never touches the base model's weights on disk, never merges (core.packaging does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.errors import BadInput
from core.train_config import TrainConfig
from core.train_dir import TrainDir
from core.training.devices import device


def load_model(config: TrainConfig, path: str):
    """The base model (4-bit NF4 for qlora and a 4-bit dpo) with fresh LoRA adapters, or the adapter of the run
    it continues (from_adapter); returns (peft model, tokenizer)."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs: dict[str, Any] = {"trust_remote_code": False, "use_safetensors": True, "dtype": dtype}
    if config.quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device()}
    if config.quantized and not cuda and Path(path).is_dir():
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        model_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        # Any: transformers types the lazy mapping's values as tuples of classes, they are classes.
        model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
        model = model_class.from_pretrained(None, config=model_config, state_dict=_read_weights(path), **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if config.quantized:
        _keep_4bit_layers_differentiable(model)
        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        if not cuda and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            _output_head_in_bf16(model)
    else:
        model.to(device())
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    torch.manual_seed(config.seed)  # the LoRA A matrices are drawn here
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if config.from_adapter:  # its LoRA settings are the config's (train_config.with_adapter_settings)
        adapter = TrainDir.holding(config.from_adapter).adapter
        return peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=True), tokenizer
    return peft.get_peft_model(model, lora_config(config)), tokenizer


def lora_config(config: TrainConfig):
    """The peft LoraConfig of a run's settings."""
    import peft

    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; a float scales as well
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
    )


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """A local checkpoint's tensors read with pread into memory of their own, not memory-mapped.

    from_pretrained maps the safetensors file and leaves the unquantized weights (embedding,
    norms) as views of it, so the whole fp32 file stays mapped and, once read, resident. For a
    4-bit CPU run that is most of the memory: on Gemma 3 270M, 1.9 GB resident after the first
    step instead of 1.2 GB.
    """
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise BadInput(f"no .safetensors weights in {path} (weights are only loaded from safetensors)")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu", backend="pread") as reader:
            weights.update({name: reader.get_tensor(name) for name in reader.keys()})  # noqa: SIM118 - a safe_open handle is not a dict
    return weights


def _output_head_in_bf16(model) -> None:
    """QLoRA on a CPU with native bf16 matmul: keep the frozen output head (and the embedding tied to it) in bf16.

    With a 262k vocabulary the head is most of a step's arithmetic, and a bf16 matmul (fp32
    accumulation, as on a GPU) runs 4x faster than fp32 here; it also halves the head's memory.
    Gemma's released weights are bf16, so nothing is lost by storing them so. The embedding's
    output is cast back to fp32, the body's compute dtype on the CPU.
    """
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    head.weight.data = head.weight.data.to(torch.bfloat16)
    if embedding.weight is head.weight:
        embedding.register_forward_hook(lambda _module, _inputs, output: output.float())


def _keep_4bit_layers_differentiable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel.

    It repacks on the first no-grad forward in eval mode (our eval loss before training), for
    good: later training forwards then run that kernel, which has no backward, and the gradient
    stops at every quantized layer without an error. The plain 4-bit path is differentiable.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
