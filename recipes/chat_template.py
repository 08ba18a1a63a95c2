"""The chat template: one Jinja source used by training, rewards, evaluation, curation and export.

Qwen-style turns (`<|im_start|>role\\n...<|im_end|>\\n`) with a reasoning block: an assistant
message is `<think>\\n{thinking}\\n</think>\\n\\n{answer}`. The think / no-think switch works as in
Qwen3: `enable_thinking=False` opens the assistant turn with an empty think block, so the model
answers directly. The same string is written into every exported `tokenizer_config.json`, so vLLM
and transformers render exactly what our own code renders.
"""

from __future__ import annotations

import re
from functools import lru_cache

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END, THINK_OPEN, THINK_CLOSE]
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


@lru_cache(maxsize=1)
def _compiled():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # the same environment flags transformers uses for chat templates
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE)


def render(messages: list[dict], add_generation_prompt: bool = False, enable_thinking: bool = True) -> str:
    """Render messages to text exactly as `tokenizer.apply_chat_template(..., tokenize=False)`."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} needs 'role' and 'content', got {m!r}")
    return _compiled().render(
        messages=messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
    )


def prompt_messages(question: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}]


def render_prompt(question: str, enable_thinking: bool = True, system: str | None = None) -> str:
    return render(prompt_messages(question, system), add_generation_prompt=True, enable_thinking=enable_thinking)


def format_response(thinking: str | None, answer: str) -> str:
    """An assistant message; thinking=None gives the no-think form (an empty think block)."""
    if thinking is None:
        return f"{EMPTY_THINK}{answer}"
    return f"{THINK_OPEN}\n{thinking}\n{THINK_CLOSE}\n\n{answer}"


_THINK_RE = re.compile(re.escape(THINK_OPEN) + r"(.*?)" + re.escape(THINK_CLOSE), re.S)


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
