"""The embedded backends: llama.cpp on the real Gemma 3 270M GGUF, transformers on tiny and real models."""

import pytest

from core.backends import USER_BACKENDS, make_backend
from core.backends.base import Backend, cut_at_stop, visible_pieces
from core.backends.hf import generate_kwargs
from core.backends.llamacpp import completion_kwargs
from core.decoding import DecodingParams
from core.errors import BackendUnavailable, BadInput, NotFound
from core.prompting import DEFAULT_TEMPLATE, render_prompt, stop_sequences

GREEDY = DecodingParams(temperature=0.0, max_tokens=24)
QUESTIONS = ["How should a researcher choose baselines?", "What is a p-value?", "Why use several random seeds?"]
PROMPTS = [render_prompt(q) for q in QUESTIONS]
STOP = stop_sequences(DEFAULT_TEMPLATE)


# ---- pure pieces -------------------------------------------------------------------------------


def test_decoding_params_are_validated_with_one_line_reasons():
    with pytest.raises(BadInput, match="temperature"):
        DecodingParams(temperature=-1)
    with pytest.raises(BadInput, match="top_p"):
        DecodingParams(top_p=1.5)
    with pytest.raises(BadInput, match="max_tokens"):
        DecodingParams.from_dict({"max_tokens": "lots"})
    with pytest.raises(BadInput, match="unknown"):
        DecodingParams.from_dict({"temprature": 1})
    assert DecodingParams.from_dict({"temperature": "0.5", "seed": ""}) == DecodingParams(temperature=0.5)


def test_each_engine_gets_every_decoding_parameter_under_its_own_name():
    params = DecodingParams(temperature=0.7, top_p=0.8, top_k=20, max_tokens=33, repeat_penalty=1.3, seed=5)
    assert completion_kwargs(params, ["\n\n"]) == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "max_tokens": 33,
        "repeat_penalty": 1.3,
        "seed": 5,
        "stop": ["\n\n"],
    }
    hf = generate_kwargs(params, pad_token_id=0)
    assert hf == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "max_new_tokens": 33,
        "repetition_penalty": 1.3,
        "pad_token_id": 0,
        "do_sample": True,
    }
    assert generate_kwargs(GREEDY, 0)["do_sample"] is False


def test_a_missing_seed_means_a_fresh_seed_per_call():
    seeds = {completion_kwargs(DecodingParams())["seed"] for _ in range(5)}
    assert len(seeds) > 1


def test_streamed_pieces_stop_at_a_stop_string_split_across_pieces():
    pieces = [" An", "swer one.", "\nQue", "stion: next?"]
    assert "".join(visible_pieces(iter(pieces), ["\nQuestion:"])) == "Answer one."
    assert cut_at_stop("a\n\nb", ["\n\n"]) == "a"


def test_the_registry_knows_every_backend_and_refuses_others():
    assert set(USER_BACKENDS) == {"llamacpp", "transformers", "ollama", "openai"}
    with pytest.raises(BadInput, match="unknown backend"):
        make_backend("gpt")
    for server in ("ollama", "openai"):
        with pytest.raises(BadInput, match="model name"):
            make_backend(server)
    echo = make_backend("echo")
    assert isinstance(echo, Backend) and echo.generate(["hi there"], GREEDY) == ["You asked: hi there"]


# ---- llama.cpp on the embedded GGUF -----------------------------------------------------------


@pytest.fixture(scope="module")
def llamacpp(embedded_models):
    return make_backend("llamacpp")


def test_llamacpp_greedy_answers_are_deterministic_and_stop_cleanly(llamacpp):
    first = llamacpp.generate(PROMPTS, GREEDY, STOP)
    assert first == llamacpp.generate(PROMPTS, GREEDY, STOP)
    assert all(a and "Question:" not in a and not a.startswith(" ") for a in first)


def test_a_llamacpp_answer_does_not_depend_on_the_question_asked_before_it(llamacpp):
    alone = llamacpp.generate(PROMPTS[:1], GREEDY, STOP)
    assert llamacpp.generate([PROMPTS[1], PROMPTS[0]], GREEDY, STOP)[1] == alone[0]  # they share a prefix


def test_llamacpp_stream_gives_the_same_text_piece_by_piece(llamacpp):
    pieces = list(llamacpp.stream(PROMPTS[0], GREEDY, STOP))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == llamacpp.generate(PROMPTS[:1], GREEDY, STOP)[0]


def test_llamacpp_honours_max_tokens_and_seed(llamacpp):
    before = llamacpp.completion_tokens
    llamacpp.generate(PROMPTS[:1], DecodingParams(temperature=0.0, max_tokens=3), ())
    assert 0 < llamacpp.completion_tokens - before <= 3
    hot = DecodingParams(temperature=1.5, top_p=1.0, top_k=0, max_tokens=20, seed=11)
    assert llamacpp.generate(PROMPTS[:1], hot) == llamacpp.generate(PROMPTS[:1], hot)


def test_llamacpp_refuses_a_missing_model_file(tmp_path):
    with pytest.raises(NotFound, match="no GGUF"):
        make_backend("llamacpp", model=str(tmp_path / "missing.gguf"))


# ---- transformers --------------------------------------------------------------------------


def test_transformers_batches_give_the_same_greedy_answers_as_one_by_one(tiny_llama):
    batched = make_backend("transformers", model=str(tiny_llama), batch_size=3)
    single = make_backend("transformers", model=str(tiny_llama), batch_size=1)
    params = DecodingParams(temperature=0.0, max_tokens=8, repeat_penalty=1.0)
    assert batched.generate(PROMPTS, params) == single.generate(PROMPTS, params)


def test_transformers_stream_matches_generate(tiny_llama):
    backend = make_backend("transformers", model=str(tiny_llama))
    params = DecodingParams(temperature=0.0, max_tokens=8, repeat_penalty=1.0)
    assert "".join(backend.stream(PROMPTS[0], params)).strip() == backend.generate(PROMPTS[:1], params)[0]


def test_transformers_applies_a_peft_adapter(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    # Random (not zero) LoRA weights, so the adapter visibly changes the output.
    lora = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    params = DecodingParams(temperature=0.0, max_tokens=8, repeat_penalty=1.0)
    plain = make_backend("transformers", model=str(tiny_llama)).generate(PROMPTS, params)
    adapted = make_backend("transformers", model=str(tiny_llama), adapter=str(tmp_path / "adapter"))
    assert adapted.generate(PROMPTS, params) != plain


def test_transformers_runs_the_embedded_checkpoint(embedded_models):
    backend = make_backend("transformers", batch_size=2)
    answers = backend.generate(PROMPTS[:2], GREEDY, STOP)
    assert all(a and "Question:" not in a for a in answers)
    assert backend.completion_tokens > 0


def test_transformers_reports_an_unloadable_model_as_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    backend = make_backend("transformers", model=str(tmp_path))
    with pytest.raises(BackendUnavailable) as info:
        backend.generate(["x"], GREEDY)
    assert "\n" not in str(info.value) and "could not load" in str(info.value)
