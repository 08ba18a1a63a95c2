"""The model's own tokenizer and chat template, loaded from a Hugging Face folder.

Stages get token ids, prompts, stop ids and assistant-only loss masks from a `ChatTokenizer`, so a
Qwen2.5, Qwen3, Llama 3.1 or DeepSeek-R1-Distill checkpoint is trained, sampled and evaluated with
the tokenizer and chat template it was released with. The embedded students' byte-level tokenizer is one more
such folder (`recipes/assets/models/tiny-qwen2`, the default of `load`). Loading goes through
`transformers.AutoTokenizer` with local files only; the folder may be a full HF checkpoint or just the
tokenizer files kept next to a Megatron checkpoint.

Think / no-think differs by family, and `thinking_modes` says which `enable_thinking` values a
template can honour:
- a template that reads the `enable_thinking` variable (Qwen3, the embedded students'): True and False;
- Llama-Nemotron style, switched by the system prompt `detailed thinking on` / `detailed thinking off`:
  True and False (the directive is put first in the system message);
- R1-distill style, whose generation prompt already opens `<think>\\n` (`generation_prompt_opens_think`;
  the response then starts inside the think block, so callers prepend `<think>\\n` before grading or
  splitting it): True only;
- templates without a switch (Qwen2.5, Llama 3.1): neither.
`enable_thinking=None` always means "the template's default"; any other value a template cannot
honour raises a ValueError naming the folder and what the template supports.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from functools import cached_property
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # any one of them holds a vocabulary
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
NEMOTRON_DIRECTIVE = "detailed thinking {}"
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTokenizer:
    """A model folder's tokenizer + chat template, with the operations every stage needs."""

    def __init__(self, hf_tokenizer, folder: str | Path, think_switch: str | None = "auto"):
        self.hf = hf_tokenizer
        self.folder = Path(folder)
        if think_switch == "auto":
            template = hf_tokenizer.chat_template or ""
            template = template.get("default", "") if isinstance(template, dict) else template
            think_switch = ("enable_thinking" if "enable_thinking" in template
                            else "system_prompt" if "detailed thinking" in template else None)
        if think_switch not in ("enable_thinking", "system_prompt", None):
            raise ValueError(f"think_switch must be 'auto', 'enable_thinking', 'system_prompt' or None, "
                             f"got {think_switch!r}")
        self.think_switch = think_switch

    @classmethod
    def from_folder(cls, path: str | Path, think_switch: str | None = "auto") -> ChatTokenizer:
        """Load with `AutoTokenizer` from a local folder. think_switch "auto" reads the template; pass
        "system_prompt" for a Llama-Nemotron model whose template does not mention `detailed thinking`."""
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"{folder}: no such model or tokenizer folder")
        if not any((folder / name).is_file() for name in VOCAB_FILES):
            raise ValueError(f"{folder}: no tokenizer here (looked for {', '.join(VOCAB_FILES)}, with "
                             f"tokenizer_config.json); export or copy the model's tokenizer files into it")
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as err:  # transformers raises OSError, ValueError, KeyError... for broken folders
            raise ValueError(f"{folder}: AutoTokenizer could not load the tokenizer: {err}") from err
        return cls(hf, folder, think_switch)

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (base vocabulary + added tokens)."""
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text; no bos/eos added (chat templates write those themselves)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @cached_property
    def generation_config(self) -> dict:
        path = self.folder / "generation_config.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    @cached_property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a response: generation_config.json `eos_token_id` (an int or a list; Llama 3.1 lists
        end_of_text, eom and eot) plus the tokenizer's eos. The end-of-turn token is among them."""
        listed = self.generation_config.get("eos_token_id")
        ids = [listed] if isinstance(listed, int) else list(listed or [])
        if self.hf.eos_token_id is not None:
            ids.append(self.hf.eos_token_id)
        return tuple(dict.fromkeys(int(i) for i in ids))

    @property
    def pad_id(self) -> int:
        """The pad token; without one (Llama 3.1), generation_config's pad_token_id, else the eos token.
        Padded positions are masked out of attention and loss, so any valid id serves."""
        for candidate in (self.hf.pad_token_id, self.generation_config.get("pad_token_id"), self.hf.eos_token_id):
            if isinstance(candidate, int):
                return candidate
        if self.stop_ids:
            return self.stop_ids[0]
        raise ValueError(f"{self.folder}: the tokenizer has no pad, eos or stop token to pad with")

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """Fail when the tokenizer can produce ids the model cannot embed (a tokenizer/model mismatch)."""
        if self.vocab_size > model_vocab_size:
            raise ValueError(f"{self.folder}: the tokenizer has {self.vocab_size} tokens but the model has "
                             f"{model_vocab_size} embedding rows (vocab_size): tokenizer/model mismatch")

    def save(self, out_dir: str | Path) -> Path:
        """Copy the folder's tokenizer files byte for byte, so an export carries the model's own tokenizer."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            src = self.folder / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
        return out

    # ------------------------------------------------------------------ chat template

    @property
    def chat_template(self) -> str:
        """The Jinja source; a ValueError naming the folder when the tokenizer has none."""
        template = self.hf.chat_template
        if not isinstance(template, (str, dict)) or not template:
            raise ValueError(f"{self.folder}: the tokenizer has no chat template (tokenizer_config.json "
                             f"'chat_template' or chat_template.jinja)")
        return template if isinstance(template, str) else template.get("default", "")

    @cached_property
    def generation_prompt_opens_think(self) -> bool:
        """True when the generation prompt ends inside an opened think block (R1-distill templates)."""
        if not isinstance(self.hf.chat_template, str):
            return False
        probe = [{"role": "user", "content": "x"}]
        with_prompt = self._render(probe, True, {})
        prompt = with_prompt.removeprefix(self._render(probe, False, {}))
        return THINK_OPEN in prompt and THINK_CLOSE not in prompt

    @property
    def thinking_modes(self) -> frozenset[bool]:
        """The `enable_thinking` values this template can honour (None, the default, always works)."""
        if self.think_switch is not None:
            return frozenset({True, False})
        return frozenset({True}) if self.generation_prompt_opens_think else frozenset()

    def describe_thinking(self) -> str:
        if self.think_switch == "enable_thinking":
            return "think and no-think through the template variable enable_thinking"
        if self.think_switch == "system_prompt":
            return "think and no-think through the system prompt 'detailed thinking on' / 'detailed thinking off'"
        if self.generation_prompt_opens_think:
            return ("thinking only: its generation prompt opens <think> (enable_thinking=None or True); "
                    "responses start inside the think block")
        return "no think switch (only enable_thinking=None, the template's own behaviour)"

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               enable_thinking: bool | None = None) -> str:
        """The conversation as text, exactly as `apply_chat_template(tokenize=False)` renders it."""
        messages, kwargs = self._switch(check_messages(messages), enable_thinking)
        return self._render(messages, add_generation_prompt, kwargs)

    def prompt_ids(self, question: str, system: str | None = None,
                   enable_thinking: bool | None = None) -> list[int]:
        """Token ids of a one-question prompt, ending with the generation prompt."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        messages, kwargs = self._switch(messages, enable_thinking)
        return self._ids(messages, True, kwargs)

    def response_text(self, generated: str) -> str:
        """A generated response in the project's format (`<think>...</think>` then the answer): where the prompt
        opened the think block (R1-distill), its opening tag is put back in front."""
        return f"{THINK_OPEN}\n{generated}" if self.generation_prompt_opens_think else generated

    def tokenize_conversation(self, messages: list[dict],
                              enable_thinking: bool | None = None) -> tuple[list[int], list[int]]:
        """(ids, mask): ids are exactly `apply_chat_template(messages, tokenize=True)`; mask is 1 on each
        assistant turn's content and its end-of-turn token(s), 0 elsewhere (system and user turns, role
        headers, generation prompts, the newline after an end-of-turn token).

        Templates with `{% generation %}` blocks give the mask themselves. Otherwise assistant turn i is the
        token span by which messages[:i+1] extends the generation prompt of messages[:i]; that needs the
        template to be prefix-stable: each prefix renders to a token prefix of the whole conversation.
        Templates that rewrite earlier turns (Qwen3 drops the reasoning of turns before the last user
        message) or whose generation prompt is not how a rendered turn starts (R1-distill opens `<think>`
        in the prompt but strips the reasoning from rendered turns) still serve a conversation with one
        assistant turn (ending at its first end-of-turn token when a later message rewrites it); with
        several, a ValueError names the folder and the turn. A template whose generation prompt opens `<think>`
        (R1-distill) trains a final assistant turn as it is generated: prompt ids + response ids + eos.
        """
        messages, kwargs = self._switch(check_messages(messages), enable_thinking)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise ValueError("the conversation has no assistant turn: nothing to train on")
        if _GENERATION_BLOCK.search(self.chat_template):
            out = self.hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True, **kwargs)
            return [int(i) for i in out["input_ids"]], [int(m) for m in out["assistant_masks"]]
        if turns[0] == 0:
            raise ValueError(f"{self.folder}: turn 0 is an assistant turn; a conversation needs a prompt before it")
        if self.generation_prompt_opens_think and turns == [len(messages) - 1]:
            return self._as_generated(messages, kwargs)
        ids = self._ids(messages, False, kwargs)
        mask = [0] * len(ids)
        end_ids = set(self.stop_ids)
        for i in turns:
            prompt = self._ids(messages[:i], True, kwargs)
            upto = self._ids(messages[:i + 1], False, kwargs)
            stable = upto == ids[:len(upto)]  # later turns do not change how this one renders
            start = _common_prefix(prompt, upto if stable else ids)
            if start < len(prompt) or not stable:  # only a lone assistant turn can still be cut out:
                before = self._ids(messages[:i], False, kwargs)  # where its prompt and its rendering part
                if len(turns) > 1 or start < len(before) or ids[:len(before)] != before:
                    raise self._not_prefix_stable(i, stable)
            if stable:
                ends = [j for j in range(start, len(upto)) if ids[j] in end_ids]
                stop = ends[-1] + 1 if ends else len(upto)
            else:  # rewritten by a later message: the turn runs to its first end-of-turn token
                stop = next((j + 1 for j in range(start, len(ids)) if ids[j] in end_ids), None)
                if stop is None:
                    raise self._not_prefix_stable(i, stable)
            mask[start:stop] = [1] * (stop - start)
        return ids, mask

    # ------------------------------------------------------------------ internals

    def _as_generated(self, messages: list[dict], kwargs: dict) -> tuple[list[int], list[int]]:
        """The last assistant turn as the model generates it: the generation prompt (which opens `<think>`), then
        the response after its opening tag, then the end-of-turn token. R1-distill templates strip the reasoning
        from every rendered assistant turn, so the template's own rendering would train on the answer alone."""
        prompt = self._ids(messages[:-1], True, kwargs)
        response = messages[-1]["content"]
        if response.startswith(THINK_OPEN):
            response = response[len(THINK_OPEN):].removeprefix("\n")
        if self.hf.eos_token_id is None:
            raise ValueError(f"{self.folder}: the tokenizer has no eos token to end the assistant turn with")
        body = self.encode(response) + [self.hf.eos_token_id]
        return prompt + body, [0] * len(prompt) + [1] * len(body)


    def _not_prefix_stable(self, turn: int, stable: bool) -> ValueError:
        problem = (f"the generation prompt of messages[:{turn}] is not how turn {turn} starts when rendered"
                   if stable else f"messages[:{turn + 1}] does not render to a token prefix of the conversation")
        return ValueError(f"{self.folder}: the chat template is not prefix-stable at turn {turn} (assistant): "
                          f"{problem}; assistant loss masks cannot be cut from this conversation (train on one "
                          f"assistant turn per conversation, or drop the reasoning of earlier turns)")

    def _switch(self, messages: list[dict], enable_thinking: bool | None) -> tuple[list[dict], dict]:
        """Messages and template variables that ask the template for think / no-think."""
        if enable_thinking is None:
            return messages, {}
        if enable_thinking not in self.thinking_modes:
            raise ValueError(f"{self.folder}: the chat template cannot honour enable_thinking={enable_thinking}; "
                             f"it supports {self.describe_thinking()}")
        if self.think_switch == "enable_thinking":
            return messages, {"enable_thinking": enable_thinking}
        if self.think_switch == "system_prompt":
            directive = NEMOTRON_DIRECTIVE.format("on" if enable_thinking else "off")
            if messages[0]["role"] == "system":
                first = {**messages[0], "content": f"{directive}\n\n{messages[0]['content']}"}
                return [first, *messages[1:]], {}
            return [{"role": "system", "content": directive}, *messages], {}
        return messages, {}  # a template that always thinks, asked to think

    def _render(self, messages: list[dict], add_generation_prompt: bool, kwargs: dict) -> str:
        _ = self.chat_template  # the clear error when the folder has no template
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **kwargs)

    def _ids(self, messages: list[dict], add_generation_prompt: bool, kwargs: dict) -> list[int]:
        _ = self.chat_template
        ids = self.hf.apply_chat_template(messages, tokenize=True, return_dict=False,
                                          add_generation_prompt=add_generation_prompt, **kwargs)
        return [int(i) for i in ids]


def check_messages(messages: object) -> list[dict]:
    """The messages as given, when they are a non-empty list of {role, content} strings; else a ValueError."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a mapping with string 'role' and 'content', got {m!r}")
    return messages


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


EMBEDDED_MODEL = Path(__file__).resolve().parent / "assets" / "models" / "tiny-qwen2"


def tokenizer_folder(path: str | Path | None) -> Path:
    """Where a model's tokenizer files are: an HF folder or tokenizer folder itself, a Megatron checkpoint's
    `tokenizer/`, or the folder of an HF config.json; None: the embedded students' (tiny-qwen2)."""
    if path is None:
        return EMBEDDED_MODEL
    p = Path(path)
    if p.is_file():
        p = p.parent
    if (p / "tokenizer").is_dir() and not any((p / name).is_file() for name in VOCAB_FILES):
        return p / "tokenizer"
    return p


_LOADED: dict[tuple[Path, str | None], ChatTokenizer] = {}
_LOADING = threading.Lock()  # threads of one server load it once (transformers' lazy imports are not thread-safe)


def load(path: str | Path | None = None, think_switch: str | None = "auto") -> ChatTokenizer:
    """The ChatTokenizer of a model (see `tokenizer_folder`), loaded once per process."""
    key = (tokenizer_folder(path).resolve(), think_switch)
    with _LOADING:
        if key not in _LOADED:
            _LOADED[key] = ChatTokenizer.from_folder(*key)
        return _LOADED[key]
