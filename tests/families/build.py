"""Family-shaped tiny Hugging Face checkpoints for tests: Qwen2.5, Qwen3, Llama 3.1, DeepSeek-R1-Distill-Qwen.

Each checkpoint has what a real one has where it matters to our code: the family's published chat
template (the `*.jinja` files next to this module), its special tokens with their real names and roles
(bos / eos / pad, end-of-turn, think tags, in the family's relative order), the family's pre-tokenizer
regex, `generation_config.json` with the family's eos ids (Llama 3.1 lists three), and a model of the
family's architecture (2 layers, hidden 128) with random weights. The byte-level BPE vocabulary is
trained on the repository's own text, so a tokenizer has merges and a few thousand tokens at most
instead of 150k, and everything is built locally in a second or two.

Deterministic: the same inputs give byte-identical files, so a session-scoped pytest fixture can
build each family once.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

QWEN_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# (token, special) in the family's id order; the first one follows the trained vocabulary as in the real
# tokenizers (Qwen's specials start at 151643, Llama 3's at 128000).
_QWEN = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
         ("<tool_call>", False), ("</tool_call>", False)]
FAMILIES: dict[str, dict] = {
    "qwen2.5": dict(
        template="qwen2.5.jinja", arch="Qwen2ForCausalLM", regex=QWEN_REGEX, nfc=True, bos_prefix=False,
        tokens=_QWEN, bos=None, eos="<|im_end|>", pad="<|endoftext|>", tokenizer_class="Qwen2Tokenizer",
        gen_bos="<|endoftext|>", gen_eos=["<|im_end|>", "<|endoftext|>"], max_len=32768),
    "qwen3": dict(
        template="qwen3.jinja", arch="Qwen3ForCausalLM", regex=QWEN_REGEX, nfc=True, bos_prefix=False,
        tokens=_QWEN + [("<tool_response>", False), ("</tool_response>", False),
                        ("<think>", False), ("</think>", False)],
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", tokenizer_class="Qwen2Tokenizer",
        gen_bos="<|endoftext|>", gen_eos=["<|im_end|>", "<|endoftext|>"], max_len=40960),
    "llama3.1": dict(
        template="llama3.1.jinja", arch="LlamaForCausalLM", regex=LLAMA3_REGEX, nfc=False, bos_prefix=True,
        tokens=[("<|begin_of_text|>", True), ("<|end_of_text|>", True), ("<|reserved_special_token_0|>", True),
                ("<|reserved_special_token_1|>", True), ("<|finetune_right_pad_id|>", True),
                ("<|reserved_special_token_2|>", True), ("<|start_header_id|>", True),
                ("<|end_header_id|>", True), ("<|eom_id|>", True), ("<|eot_id|>", True), ("<|python_tag|>", True)],
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, tokenizer_class="PreTrainedTokenizerFast",
        gen_bos="<|begin_of_text|>", gen_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], max_len=131072),
    "r1-distill": dict(
        template="r1-distill.jinja", arch="Qwen2ForCausalLM", regex=QWEN_REGEX, nfc=True, bos_prefix=True,
        tokens=[("<｜end▁of▁sentence｜>", True), ("<｜User｜>", False), ("<｜Assistant｜>", False),
                ("<｜begin▁of▁sentence｜>", True), ("<|EOT|>", False), ("<think>", False), ("</think>", False)],
        bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad="<｜end▁of▁sentence｜>",
        tokenizer_class="LlamaTokenizerFast", gen_bos="<｜begin▁of▁sentence｜>", gen_eos=["<｜end▁of▁sentence｜>"],
        max_len=16384),
}


def template_text(name: str) -> str:
    """The family's published chat template, without the leading `{#- source: ... -#}` line."""
    text = (HERE / FAMILIES[name]["template"]).read_text(encoding="utf-8")
    first, rest = text.split("\n", 1)
    assert first.startswith("{#- source:") and first.endswith("-#}"), f"{name}: template has no source line"
    return rest


def corpus(root: Path = ROOT, benchmark_lines: int = 200) -> list[str]:
    """Local training text: the README, the docs and the first benchmark questions, in a fixed order."""
    texts = [(root / "README.md").read_text(encoding="utf-8")]
    texts += [p.read_text(encoding="utf-8") for p in sorted((root / "docs").glob("*.md"))]
    for path in sorted((root / "recipes/assets/data/benchmarks").glob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            for _, line in zip(range(benchmark_lines), fh):
                rec = json.loads(line)
                texts.append(str(rec.get("question") or rec.get("problem") or ""))
    return texts


def _train_tokenizer(spec: dict, texts: list[str], vocab_size: int):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC() if spec["nfc"] else None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["regex"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in spec["tokens"]])
    byte_level = processors.ByteLevel(trim_offsets=False)
    if spec["bos_prefix"]:  # the tokenizer prepends bos when asked for special tokens, as Llama 3 and R1-distill do
        bos = spec["bos"]
        tok.post_processor = processors.Sequence([byte_level, processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))])])
    else:
        tok.post_processor = byte_level
    return tok


def build_family(name: str, out_dir: str | Path, vocab_size: int = 1024, seed: int = 0) -> Path:
    """Write a tiny `name` checkpoint (tokenizer files + config.json + safetensors weights) into out_dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; one of {sorted(FAMILIES)}")
    spec = FAMILIES[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(spec, corpus(), vocab_size)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t, _ in spec["tokens"]}
    added = {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": s} for t, s in spec["tokens"]}
    named = {"bos_token": spec["bos"], "eos_token": spec["eos"], "pad_token": spec["pad"]}
    extra = [t for t, s in spec["tokens"] if s and t not in named.values()]
    config = {"add_bos_token": spec["bos_prefix"], "add_eos_token": False, "add_prefix_space": False,
              "added_tokens_decoder": added, **named, "additional_special_tokens": extra,
              "chat_template": template_text(name), "clean_up_tokenization_spaces": False,
              "errors": "replace", "model_max_length": spec["max_len"], "split_special_tokens": False,
              "tokenizer_class": spec["tokenizer_class"], "unk_token": None}
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json",
                {**{k: v for k, v in named.items() if v}, "additional_special_tokens": extra})
    gen_eos = [ids[t] for t in spec["gen_eos"]]
    generation = {"bos_token_id": ids[spec["gen_bos"]], "eos_token_id": gen_eos[0] if len(gen_eos) == 1 else gen_eos,
                  "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    if spec["pad"]:
        generation["pad_token_id"] = ids[spec["pad"]]
    _write_json(out / "generation_config.json", generation)

    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    model_type = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}[spec["arch"]]
    cfg = AutoConfig.for_model(
        model_type, vocab_size=-(-n_tokens // 64) * 64, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,  # vLLM CPU: head_dim >= 32
        max_position_embeddings=2048, tie_word_embeddings=model_type != "llama",
        bos_token_id=ids[spec["gen_bos"]], eos_token_id=gen_eos[0] if len(gen_eos) == 1 else gen_eos,
        architectures=[spec["arch"]])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    # save_pretrained writes its own generation_config.json from the model config: keep the family's
    _write_json(out / "generation_config.json", generation)
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    import sys

    for fam in sys.argv[2:] or sorted(FAMILIES):
        print(build_family(fam, Path(sys.argv[1]) / fam))
