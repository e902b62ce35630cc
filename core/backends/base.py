"""The one protocol every generation backend implements.

A backend turns prompt texts into answers. It never touches the store and never decides
what a prompt looks like (that is core.prompting). `stop` lists strings at which an answer
ends (not included in it). `completion_tokens` counts tokens produced so far, for tokens/s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from core.decoding import DecodingParams


@runtime_checkable
class Backend(Protocol):
    name: str
    completion_tokens: int

    def generate(self, prompts: Sequence[str], params: DecodingParams, stop: Sequence[str] = ()) -> list[str]:
        """One answer per prompt, in order."""
        ...

    def stream(self, prompt: str, params: DecodingParams, stop: Sequence[str] = ()) -> Iterator[str]:
        """The answer to one prompt, as text pieces in the order they are produced."""
        ...

    def models(self) -> list[str]:
        """Names of the models this backend can serve."""
        ...


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text up to the first stop string, for engines that cannot stop by themselves."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def visible_pieces(pieces: Iterator[str], stop: Sequence[str] = ()) -> Iterator[str]:
    """Turn raw streamed pieces into what the user sees: no leading whitespace, ending at a stop string.

    Streaming engines may split a stop string across pieces, so the check runs on the text so far.
    """
    text, shown = "", 0
    for piece in pieces:
        text += piece
        visible = cut_at_stop(text, stop).lstrip()
        stopped = len(cut_at_stop(text, stop)) < len(text)
        # Hold back a tail that might be the start of a stop string still arriving.
        hold = 0 if stopped else max((len(s) - 1 for s in stop if s), default=0)
        ready = visible[: max(len(visible) - hold, shown)]
        if len(ready) > shown:
            yield ready[shown:]
            shown = len(ready)
        if stopped:
            return
    visible = cut_at_stop(text, stop).strip()
    if len(visible) > shown:
        yield visible[shown:]
