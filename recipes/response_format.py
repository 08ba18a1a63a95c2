"""The reasoning response format: an assistant message is `<think>\\n{thinking}\\n</think>\\n\\n{answer}`.

Every trace record, teacher reply and reward reads responses in this form, whatever the model's chat template:
`format_response` writes it (thinking=None gives the no-think form, an empty think block, as Qwen3 writes it) and
`split_response` is the one place a response is cut at its think block.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"


def format_response(thinking: str | None, answer: str) -> str:
    """An assistant message; thinking=None gives the no-think form (an empty think block)."""
    if thinking is None:
        return f"{EMPTY_THINK}{answer}"
    return f"{THINK_OPEN}\n{thinking}\n{THINK_CLOSE}\n\n{answer}"


def split_response(text: str) -> tuple[str | None, str, bool]:
    """(thinking, answer part, think block closed): the one place a response is cut at its think block.

    The answer part is the text after the last `</think>` (the thinking is everything before it, after
    the first `<think>`); an unclosed think block has no answer part yet; a response without a think
    block has thinking None and is all answer. Handles responses that start inside the think block
    (the opening tag was in the prompt).
    """
    if THINK_CLOSE in text:
        head, _, tail = text.rpartition(THINK_CLOSE)
        thinking = head.split(THINK_OPEN, 1)[-1]
        return thinking.strip("\n"), tail.strip(), True
    if THINK_OPEN in text:
        return text.split(THINK_OPEN, 1)[1].strip("\n"), "", False
    return None, text.strip(), False
