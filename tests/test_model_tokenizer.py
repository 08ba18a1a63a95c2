"""ChatTokenizer on family-shaped tiny checkpoints (Qwen2.5, Qwen3, Llama 3.1, R1-distill) and on the project's
own byte-level tokenizer: exact ids, assistant-only masks, stop ids, think switches, errors, save."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from recipes.tokenizer import ChatTokenizer
from tests.families.build import FAMILIES, build_family

THINK = "<think>\nAdd 2 and 3.\n</think>\n\nThe answer is 5."
CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": THINK}]
MULTI = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "What is 2+3?"},
         {"role": "assistant", "content": "It is 5."},
         {"role": "user", "content": "And 4+4?"},
         {"role": "assistant", "content": "It is 8."}]

# what the mask must select, per family, for CONV: the assistant content as the template renders it + end of turn
MASKED = {
    "qwen2.5": THINK + "<|im_end|>",
    "qwen3": THINK + "<|im_end|>",
    "llama3.1": THINK + "<|eot_id|>",
    # trained as generated: the prompt opens the think block, the response continues it (the published template
    # strips the reasoning from rendered assistant turns, so its own rendering would train on the answer alone)
    "r1-distill": "Add 2 and 3.\n</think>\n\nThe answer is 5.<｜end▁of▁sentence｜>",
}
AFTER_TURN = {"qwen2.5": "\n", "qwen3": "\n", "llama3.1": "", "r1-distill": ""}  # rendered after the end-of-turn


@pytest.fixture(scope="session")
def toks(families) -> dict[str, ChatTokenizer]:
    return {name: ChatTokenizer.from_folder(path) for name, path in families.items()}


def runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The masked spans, each a list of ids."""
    out, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            out, cur = out + [cur], []
    return out + ([cur] if cur else [])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_single_turn_ids_are_the_templates_and_mask_is_the_assistant_turn(name, families, toks):
    from transformers import AutoTokenizer

    tok = toks[name]
    ids, mask = tok.tokenize_conversation(CONV)
    reference = AutoTokenizer.from_pretrained(families[name], local_files_only=True)
    if tok.generation_prompt_opens_think:  # prompt as the template renders it, then the response as generated
        prompt_ids = reference.apply_chat_template(CONV[:-1], add_generation_prompt=True, tokenize=True)["input_ids"]
        response = THINK.removeprefix("<think>\n")
        assert ids == prompt_ids + reference.encode(response, add_special_tokens=False) + [reference.eos_token_id]
    else:
        assert ids == reference.apply_chat_template(CONV, tokenize=True)["input_ids"]
    assert len(mask) == len(ids) and set(mask) == {0, 1}
    (span,) = runs(ids, mask)  # one contiguous block
    assert tok.decode(span) == MASKED[name]
    first = mask.index(1)
    prompt = tok.render(CONV[:-1], add_generation_prompt=True)
    assert tok.decode(ids[:first]) == prompt
    assert tok.decode(ids[first + len(span):]) == AFTER_TURN[name]
    if tok.generation_prompt_opens_think:
        assert prompt.endswith("<think>\n") and tok.decode(ids) == prompt + MASKED[name]
    else:
        assert tok.decode(ids) == tok.render(CONV)


def test_autotokenizer_tokenizes_as_the_tokenizer_json(families, toks):
    from tokenizers import Tokenizer  # transformers may rebuild the pipeline (R1 names LlamaTokenizerFast)

    text = "Janet's 16 ducks\n\n<think>\nx = 3\n</think>\n\n\\boxed{42}  ok<|im_end|>"
    for name, folder in families.items():
        raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
        assert toks[name].encode(text) == raw.encode(text, add_special_tokens=False).ids, name
        assert toks[name].decode(toks[name].encode(text)) == text


@pytest.mark.parametrize("name,eot", [("qwen2.5", "<|im_end|>"), ("llama3.1", "<|eot_id|>")])
def test_multi_turn_masks_every_assistant_turn(name, eot, toks):
    tok = toks[name]
    ids, mask = tok.tokenize_conversation(MULTI)
    assert [tok.decode(r) for r in runs(ids, mask)] == ["It is 5." + eot, "It is 8." + eot]
    assert "And 4+4?" in tok.decode([i for i, m in zip(ids, mask) if not m])


@pytest.mark.parametrize("name", ["qwen3", "r1-distill"])
def test_multi_turn_on_a_template_that_is_not_prefix_stable_names_the_turn(name, families, toks):
    conv = [CONV[1], {"role": "assistant", "content": THINK}, {"role": "user", "content": "And 4+4?"},
            {"role": "assistant", "content": "<think>\n4+4=8\n</think>\n\nIt is 8."}]
    with pytest.raises(ValueError, match=r"not prefix-stable at turn 1") as err:
        toks[name].tokenize_conversation(conv)
    assert str(families[name]) in str(err.value)


def test_a_lone_assistant_turn_rewritten_by_a_later_message_is_still_cut_out(toks):
    tok = toks["qwen3"]  # the later user message makes Qwen3 drop the turn's reasoning
    conv = [CONV[1], {"role": "assistant", "content": THINK}, {"role": "user", "content": "Thanks"}]
    ids, mask = tok.tokenize_conversation(conv)
    assert ids == tok.hf.apply_chat_template(conv, tokenize=True, return_dict=False)
    assert [tok.decode(r) for r in runs(ids, mask)] == ["The answer is 5.<|im_end|>"]


def test_stop_ids_and_pad(families, toks):
    llama = toks["llama3.1"]
    listed = json.loads((families["llama3.1"] / "generation_config.json").read_text())["eos_token_id"]
    assert llama.stop_ids == tuple(listed)
    assert llama.stop_ids == tuple(llama.hf.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]))
    assert llama.hf.pad_token_id is None and llama.pad_id == llama.hf.convert_tokens_to_ids("<|eot_id|>")
    for name in ("qwen2.5", "qwen3"):
        q = toks[name]
        assert q.stop_ids == tuple(q.hf.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
        assert q.pad_id == q.hf.convert_tokens_to_ids("<|endoftext|>")
    r1 = toks["r1-distill"]
    assert r1.stop_ids == (r1.hf.convert_tokens_to_ids("<｜end▁of▁sentence｜>"),)


def test_think_switches(families, toks):
    qwen3, r1, qwen25, llama = toks["qwen3"], toks["r1-distill"], toks["qwen2.5"], toks["llama3.1"]
    q = [CONV[1]]
    assert qwen3.think_switch == "enable_thinking" and qwen3.thinking_modes == {True, False}
    no_think = qwen3.render(q, add_generation_prompt=True, enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert qwen3.render(q, add_generation_prompt=True, enable_thinking=True).endswith("<|im_start|>assistant\n")
    assert qwen3.decode(qwen3.prompt_ids("What is 2+3?", enable_thinking=False)) == no_think

    assert r1.generation_prompt_opens_think and r1.thinking_modes == {True}
    assert r1.decode(r1.prompt_ids("What is 2+3?")).endswith("<｜Assistant｜><think>\n")
    assert r1.prompt_ids("What is 2+3?", enable_thinking=True) == r1.prompt_ids("What is 2+3?")
    with pytest.raises(ValueError, match="opens <think>") as err:
        r1.prompt_ids("What is 2+3?", enable_thinking=False)
    assert str(families["r1-distill"]) in str(err.value)

    for name, tok in (("qwen2.5", qwen25), ("llama3.1", llama)):
        assert tok.think_switch is None and not tok.generation_prompt_opens_think and tok.thinking_modes == set()
        with pytest.raises(ValueError, match="no think switch") as err:
            tok.render(q, add_generation_prompt=True, enable_thinking=False)
        assert str(families[name]) in str(err.value)


def test_system_prompt_switch_llama_nemotron_style(families):
    tok = ChatTokenizer.from_folder(families["llama3.1"], think_switch="system_prompt")
    off = tok.render([CONV[1]], add_generation_prompt=True, enable_thinking=False)
    assert "Today Date: 26 Jul 2024\n\ndetailed thinking off<|eot_id|>" in off
    on = tok.render(CONV[:2], add_generation_prompt=True, enable_thinking=True)
    assert "\n\ndetailed thinking on\n\nBe brief.<|eot_id|>" in on
    ids, mask = tok.tokenize_conversation(CONV, enable_thinking=True)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == THINK + "<|eot_id|>"
    auto = ChatTokenizer(tok.hf, tok.folder)  # a template that names the directive switches by itself
    assert auto.think_switch is None
    tok.hf.chat_template = "{#- system prompt: detailed thinking on / off -#}" + tok.hf.chat_template
    assert ChatTokenizer(tok.hf, tok.folder).thinking_modes == {True, False}


def test_generation_blocks_give_the_mask(families, tmp_path):
    folder = shutil.copytree(families["qwen2.5"], tmp_path / "marked")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = ChatTokenizer.from_folder(folder)
    ids, mask = tok.tokenize_conversation(MULTI)
    assert [tok.decode(r) for r in runs(ids, mask)] == ["It is 5.<|im_end|>", "It is 8.<|im_end|>"]
    assert ids == tok.hf.apply_chat_template(MULTI, tokenize=True, return_dict=False)


def test_bad_inputs(families, toks, tmp_path):
    empty = tmp_path / "megatron_ckpt"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer here.*tokenizer.json") as err:
        ChatTokenizer.from_folder(empty)
    assert str(empty) in str(err.value)
    with pytest.raises(ValueError, match="no such"):
        ChatTokenizer.from_folder(tmp_path / "missing")

    tok = toks["qwen2.5"]
    model_vocab = json.loads((families["qwen2.5"] / "config.json").read_text())["vocab_size"]
    tok.check_model_vocab(model_vocab)
    tok.check_model_vocab(tok.vocab_size)
    with pytest.raises(ValueError, match=rf"{tok.vocab_size} tokens .* {tok.vocab_size - 1} embedding rows"):
        tok.check_model_vocab(tok.vocab_size - 1)
    with pytest.raises(ValueError, match="no assistant turn"):
        tok.tokenize_conversation(CONV[:2])
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        tok.render([CONV[0], {"role": "user"}])
    with pytest.raises(ValueError, match="turn 0 is an assistant turn"):
        tok.tokenize_conversation([CONV[2]])

    bare = shutil.copytree(families["qwen2.5"], tmp_path / "base_model")
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    base = ChatTokenizer.from_folder(bare)
    assert base.encode("What is 2+3?") == tok.encode("What is 2+3?") and base.thinking_modes == set()
    with pytest.raises(ValueError, match="no chat template") as err:
        base.prompt_ids("What is 2+3?")
    assert str(bare) in str(err.value)


def test_save_copies_the_tokenizer_files_unchanged(families, toks, tmp_path):
    src = families["llama3.1"]
    out = toks["llama3.1"].save(tmp_path / "export")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert all((out / n).read_bytes() == (src / n).read_bytes() for n in names)
    again = ChatTokenizer.from_folder(out)
    assert again.tokenize_conversation(CONV) == toks["llama3.1"].tokenize_conversation(CONV)
    assert again.stop_ids == toks["llama3.1"].stop_ids


def test_family_checkpoints_load_and_run(families, toks):
    import torch
    from transformers import AutoModelForCausalLM

    for name, folder in families.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model).__name__ == FAMILIES[name]["arch"]
        vocab = model.config.vocab_size
        assert vocab % 64 == 0 and 0 <= vocab - toks[name].vocab_size < 64
        toks[name].check_model_vocab(vocab)
        ids, _ = toks[name].tokenize_conversation(CONV)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits
        assert logits.shape == (1, len(ids), vocab)


def test_build_is_deterministic(families, tmp_path):
    again = build_family("qwen2.5", tmp_path / "again")
    for path in sorted(families["qwen2.5"].iterdir()):
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def test_the_embedded_students_tokenizer_is_one_more_model_tokenizer(tmp_path):
    """The shipped files are the byte-level builder's output, and ChatTokenizer gives the ids and mask of a
    hand-cut rendering: one id per UTF-8 byte, the specials as single ids, the loss on the assistant content
    and its <|im_end|> (not the newline after it)."""
    from recipes import tokenizer
    from recipes.response_format import format_response
    from tests.families.byte_level import SPECIAL_TOKENS, save_byte_level_tokenizer

    fresh = save_byte_level_tokenizer(tmp_path / "fresh")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        for model in ("tiny-qwen2", "tiny-llama3"):
            assert (tokenizer.EMBEDDED_MODEL.parent / model / name).read_bytes() == (fresh / name).read_bytes()
    tok = tokenizer.load()
    special = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
    assert tok.vocab_size == 262 and tok.stop_ids == (special["<|im_end|>"],) and tok.pad_id == special["<|pad|>"]
    assert tok.think_switch == "enable_thinking" and tok.thinking_modes == {True, False}

    def ids_of(*parts):  # specials by name, text as bytes
        return [i for p in parts for i in ([special[p]] if p in special else list(p.encode()))]

    question = "What is 2+3? é"
    for response in (format_response("Add 2 and 3.", "\\boxed{5}"), format_response(None, "\\boxed{5}")):
        conv = [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
        ids, mask = tok.tokenize_conversation(conv)
        head = ids_of("<|im_start|>", "user\n" + question, "<|im_end|>", "\n", "<|im_start|>", "assistant\n")
        body = tok.encode(response) + [special["<|im_end|>"]]
        assert ids == head + body + ids_of("\n")
        assert mask == [0] * len(head) + [1] * len(body) + [0]
        assert tok.decode(body) == response + "<|im_end|>"
    off = tok.prompt_ids(question, enable_thinking=False)
    assert off[-len(ids_of("<think>", "\n\n", "</think>", "\n\n")):] == ids_of("<think>", "\n\n", "</think>", "\n\n")
    assert tokenizer.load(tokenizer.EMBEDDED_MODEL / "config.json") is tok  # a config.json names its folder
