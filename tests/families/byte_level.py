"""The embedded students' tokenizer (recipes/assets/models/tiny-*): byte-level, no merges, plus the chat specials.

Every UTF-8 byte is a token, so any text round-trips, including benchmark LaTeX and language-mixed spans, and
arithmetic stays one character per token as the tiny models need. Its chat template is Qwen-style ChatML with a
reasoning block and Qwen3's think switch (`enable_thinking=False` opens the assistant turn with an empty think
block). The shipped files are this builder's output (tests/test_model_tokenizer.py checks they still are):

    python tests/families/byte_level.py recipes/assets/models/tiny-qwen2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
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


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table (the ByteLevel alphabet)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_tokenizer():
    """A `tokenizers.Tokenizer`: ids 0..255 are bytes, then the special tokens in a fixed order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def save_byte_level_tokenizer(out_dir: str | Path) -> Path:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    extra = ["<think>", "</think>", "<|im_start|>"]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096, "bos_token": None,
              "eos_token": "<|im_end|>", "pad_token": "<|pad|>", "unk_token": None, "added_tokens_decoder": added,
              "additional_special_tokens": extra, "chat_template": CHAT_TEMPLATE,
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|pad|>", "additional_special_tokens": extra}, indent=2))
    return out


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        print(save_byte_level_tokenizer(folder))
