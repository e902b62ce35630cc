"""Playground: ask one question with live decoding parameters, one or two settings side by side.

The answer streams token by token and is scored with BERTScore F1 against the reference
when the question comes from the dataset. The model stays loaded between runs.
"""

import time

import streamlit as st

from core import dataset, settings
from core.backends import USER_BACKENDS
from core.decoding import DecodingParams
from core.errors import WorkbenchError
from core.prompting import DEFAULT_TEMPLATE, render_prompt, stop_sequences
from workbench import ui

st.title("Playground")
store = ui.store()

top1, top2, top3 = st.columns([1, 2, 1])
backend_name = top1.selectbox("Backend", USER_BACKENDS, help="llamacpp: the embedded engine, as Ollama runs it")
model = top2.text_input(
    "Model",
    "",
    placeholder={"ollama": "e.g. llama2:7b", "openai": "a model the server serves"}.get(
        backend_name, "embedded Gemma 3 270M"
    ),
    help="A GGUF file (llamacpp), a checkpoint folder (transformers), an Ollama model name, or the name of a model"
    " the OpenAI-compatible server of Settings serves (openai)",
)
side_by_side = top3.toggle("Two settings side by side", value=False)

name = ui.dataset_picker()
source = st.radio("Question", ["from the dataset", "my own"], horizontal=True, label_visibility="collapsed")
reference = None
if source == "from the dataset" and name:
    frame = dataset.pairs_frame(store, name, ["accepted"])
    if frame.empty:
        st.info("This dataset has no accepted pairs yet.")
        st.stop()
    index = st.selectbox("Question", range(len(frame)), format_func=lambda i: frame["question"].iloc[i])
    question, reference = frame["question"].iloc[index], frame["answer"].iloc[index]
else:
    question = st.text_area("Question", "How should a researcher choose baselines for a new method?", height=80)
template = st.text_input(
    "Prompt template",
    DEFAULT_TEMPLATE.replace("\n", "\\n"),
    help="{question} is replaced by the question; \\n is a new line",
).replace("\\n", "\n")

with st.form("playground"):
    columns = st.columns(2) if side_by_side else [st.container()]
    chosen: list[DecodingParams] = []
    for i, col in enumerate(columns):
        with col:
            if side_by_side:
                st.markdown(f"**Setting {'AB'[i]}**")
            params = ui.attempt(lambda i=i: ui.decoding_sliders(f"pg{i}"))
            chosen.append(params)
    run = st.form_submit_button("Run", type="primary", icon=":material/play_arrow:", shortcut="ctrl+enter")

if reference:
    with st.expander("Reference answer"):
        st.text(reference)

if run and all(chosen):

    def configured_backend():
        # Settings apply as in every run (core.settings); an embedded model not prepared yet is prepared here.
        note = st.empty()
        resolved = settings.resolve_generator(store, backend_name, model, progress=note.info)
        note.empty()
        options = settings.backend_options(store, backend_name)
        return ui.loaded_backend(backend_name, resolved, tuple(sorted(options.items())))

    backend = ui.attempt(configured_backend)
    prompt = ui.attempt(lambda: render_prompt(question, template))
    if backend is not None and prompt is not None:
        outputs = st.columns(len(chosen))
        for col, params, label in zip(outputs, chosen, "AB"):
            with col:
                if side_by_side:
                    st.markdown(f"**Answer {label}**")
                box = st.empty()
                text, started, first = "", time.perf_counter(), None

                def stream(params=params):
                    return backend.stream(prompt, params, stop_sequences(template))

                pieces = ui.attempt(stream)
                failed = pieces is None
                try:
                    for piece in pieces or []:
                        first = first or time.perf_counter() - started
                        text += piece
                        box.text(text)
                except WorkbenchError as exc:  # a server that vanished, an engine that crashed: keep what arrived
                    st.error(ui.plain(exc), icon=":material/error:")
                    failed = True
                if not text and not failed:
                    box.text("(the model gave an empty answer: it stopped at once)")
                total = time.perf_counter() - started

                caption = f"first token {first:.2f} s · {total:.1f} s in all" if first else "no answer"
                if reference and text:
                    score = ui.attempt(
                        lambda text=text: ui.loaded_scorer(settings.resolve_scorer(store)).score(
                            [text], [reference], store
                        )[0]
                    )
                    if score:
                        caption += f" · BERTScore F1 {score.f1:.3f} · ROUGE-L {score.rouge_l:.3f}"
                st.caption(caption)
