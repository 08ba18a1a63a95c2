"""The project's tokenizer: byte-level, no merges, plus the chat specials as single tokens.

Built in code (no hub, nothing to train): every UTF-8 byte is a token, so any text round-trips,
including benchmark LaTeX and language-mixed spans, and arithmetic stays one character per token
as the tiny models need. Saved in Hugging Face format (tokenizer.json + tokenizer_config.json with
the chat template) so transformers and vLLM load the same tokenizer our code uses.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from recipes import chat_template as ct

MODEL_MAX_LENGTH = 4096


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


@lru_cache(maxsize=1)
def build_tokenizer():
    """A `tokenizers.Tokenizer`: ids 0..255 are bytes, then the special tokens in a fixed order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(ct.SPECIAL_TOKENS)
    return tok


def vocab_size() -> int:
    return build_tokenizer().get_vocab_size()


def token_id(token: str) -> int:
    tid = build_tokenizer().token_to_id(token)
    if tid is None:
        raise KeyError(token)
    return tid


def encode(text: str) -> list[int]:
    return build_tokenizer().encode(text, add_special_tokens=False).ids


def decode(ids: list[int], skip_special_tokens: bool = False) -> str:
    return build_tokenizer().decode(list(ids), skip_special_tokens=skip_special_tokens)


def eos_id() -> int:
    return token_id(ct.IM_END)


def pad_id() -> int:
    return token_id(ct.PAD)


def save_hf_tokenizer(out_dir: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer.json"))
    added = {
        str(token_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True}
        for t in ct.SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": None,
        "eos_token": ct.IM_END,
        "pad_token": ct.PAD,
        "unk_token": None,
        "added_tokens_decoder": added,
        "additional_special_tokens": [ct.THINK_OPEN, ct.THINK_CLOSE, ct.IM_START],
        "chat_template": ct.CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": ct.IM_END, "pad_token": ct.PAD,
                    "additional_special_tokens": [ct.THINK_OPEN, ct.THINK_CLOSE, ct.IM_START]}, indent=2)
    )
    return out


def check_compatible(hf_dir: str | Path) -> None:
    """Fail clearly when a folder's tokenizer is not this project's (a tokenizer/model mismatch)."""
    path = Path(hf_dir) / "tokenizer.json"
    if not path.exists():
        raise ValueError(f"{hf_dir}: no tokenizer.json")
    from tokenizers import Tokenizer

    other = Tokenizer.from_file(str(path))
    if other.get_vocab() != build_tokenizer().get_vocab():
        raise ValueError(
            f"{path}: tokenizer vocabulary differs from the project's byte-level tokenizer "
            f"({other.get_vocab_size()} vs {vocab_size()} tokens)"
        )
