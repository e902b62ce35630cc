"""The one place where a question becomes prompt text, for generation, training and evaluation alike.

The embedded Gemma 3 270M is a base model without a chat template, so prompts are plain
completion text; the stop sequences keep a base model from inventing the next question.
"""

from __future__ import annotations

from core.errors import BadInput

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"


def check_template(template: str) -> str:
    if "{question}" not in template:
        raise BadInput("the prompt template must contain {question}")
    try:
        template.format(question="")
    except (KeyError, IndexError, ValueError) as exc:
        raise BadInput(f"the prompt template has a placeholder other than {{question}}: {exc}") from None
    return template


def render_prompt(question: str, template: str = DEFAULT_TEMPLATE) -> str:
    return check_template(template).format(question=question.strip())


def stop_sequences(template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Where an answer ends: at a blank line, or where the model starts the template over."""
    head = template.split("{question}", 1)[0].strip()
    stops = ["\n\n"]
    if head:
        stops.append("\n" + head)
    return stops
