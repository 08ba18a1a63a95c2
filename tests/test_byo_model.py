"""Bring your own model and data: family-shaped tiny checkpoints (Qwen2.5, Qwen3, Llama 3.1, R1-distill; see
tests/families/) trained on public trace schemas (OpenR1-Math, Llama-Nemotron, OpenThoughts) and sampled by GRPO
on GSM8K prompts, each through its own tokenizer, chat template and stop ids."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.data import sft_dataset as sd
from recipes.data.schemas import DatasetSource, read_prompts, read_traces
from recipes.trainer import ModelConfig, model_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
THOUGHT = "Add 2 and 3: 5."
END_OF_TURN = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3.1": "<|eot_id|>",
               "r1-distill": "<｜end▁of▁sentence｜>"}

# one problem per schema, in the datasets' own column names (see recipes/data/schemas.py for the cards)
ROWS = {
    "openr1": [{"problem": "What is 2+3?", "solution": "5", "answer": "5", "uuid": "u1",
                "generations": [f"<think>\n{THOUGHT}\n</think>\n\nThe answer is $\\boxed{{5}}$.",
                                "<think>\nguess\n</think>\n\n$\\boxed{6}$"],
                "correctness_math_verify": [True, False]}],
    "nemotron": [{"input": [{"role": "user", "content": "What is 2+3?"}], "system_prompt": "detailed thinking on",
                  "output": f"<think>\n{THOUGHT}\n</think>\n\n$\\boxed{{5}}$", "reasoning": "on", "category": "math",
                  "license": "cc-by-4.0", "generator": "R1", "used_in_training": "yes"},
                 {"input": [{"role": "user", "content": "What is 4+4?"}], "system_prompt": "detailed thinking off",
                  "output": "$\\boxed{8}$", "reasoning": "off", "category": "math", "license": "cc-by-4.0",
                  "generator": "R1", "used_in_training": "yes"}],
    "openthoughts": [{"system": "Think first.", "conversations": [
        {"from": "user", "value": "What is 2+3?"},
        {"from": "assistant", "value": f"<|begin_of_thought|>\n\n{THOUGHT}\n\n<|end_of_thought|>\n\n"
                                       "<|begin_of_solution|>\n\n$\\boxed{5}$\n\n<|end_of_solution|>"}]}],
}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _expected_ids(hf_tok, messages: list[dict], opens_think: bool) -> list[int]:
    """What the model is trained on, by transformers alone: the template's rendering of the conversation; for a
    template whose generation prompt opens <think> (R1-distill), that prompt then the response as generated."""
    if not opens_think:
        return hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    prompt = hf_tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
    response = messages[-1]["content"].removeprefix("<think>\n")
    return prompt + hf_tok.encode(response, add_special_tokens=False) + [hf_tok.eos_token_id]


@pytest.mark.parametrize("schema", sorted(ROWS))
def test_sft_examples_are_each_familys_own_template(schema, families, tmp_path):
    from transformers import AutoTokenizer

    data = _write(tmp_path / f"{schema}.jsonl", ROWS[schema])
    records = [r for _, r in read_traces(DatasetSource(str(data)))]
    assert len(records) == len(ROWS[schema])  # OpenR1: the generation math-verify rejected is not trained on
    for name, folder in families.items():
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        tok = model_tokenizer(ModelConfig(hf_config=None, init_checkpoint=str(folder)), vocab)
        examples, stats = sd.load_examples(data, sd.DataConfig(seq_length=512), vocab, tok)
        assert stats.examples == len(records)
        reference = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        for ex, rec in zip(examples, records):
            ids = ex.input_ids.tolist() + ex.labels[-1:].tolist()
            assert ids == _expected_ids(reference, rec["messages"], tok.generation_prompt_opens_think), (name, schema)
            # the loss covers the assistant turn as the model writes it, and its end-of-turn token
            trained = reference.decode([t for t, m in zip(ex.labels, ex.loss_mask) if m])
            content = rec["messages"][-1]["content"]
            if tok.generation_prompt_opens_think:  # the prompt opened the think block
                content = content.removeprefix("<think>\n")
            if not rec["enable_thinking"] and False in tok.thinking_modes:  # Qwen3's no-think prompt closes it
                content = content.removeprefix("<think>\n\n</think>\n\n")
            assert trained == content + END_OF_TURN[name], (name, schema)


@pytest.mark.slow
def test_nrr_sft_from_an_hf_folder_trains_and_exports_the_models_own_tokenizer(families, tmp_path):
    """`nrr sft` with only model.init_checkpoint and data.train_path changed: the architecture, tokenizer and
    template come from the folder; the export carries the folder's tokenizer files byte for byte."""
    data = _write(tmp_path / "openr1.jsonl", ROWS["openr1"] * 8)
    for name in ("llama3.1", "r1-distill"):
        run = tmp_path / name
        cmd = [sys.executable, "-m", "recipes.sft", "--config", "nemo_configs/sft/tiny_cpu.yaml",
               f"model.init_checkpoint={families[name]}", f"data.train_path={data}", f"output_dir={run}",
               "data.seq_length=256", "training.global_batch_size=4", "training.micro_batch_size=2",
               "training.max_steps=2", "training.warmup_steps=0", "validation.every_steps=0",
               "checkpoint.every_steps=0", "logging.progress=false", "logging.tensorboard=false"]
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            assert (run / "hf" / f).read_bytes() == (families[name] / f).read_bytes(), (name, f)
        exported = json.loads((run / "hf" / "config.json").read_text())
        source = json.loads((families[name] / "config.json").read_text())
        assert exported["vocab_size"] == source["vocab_size"] and exported["model_type"] == source["model_type"]
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line]
        assert len(losses) >= 2 and all(0 < x < 20 for x in losses)


def test_bad_models_and_datasets_fail_clearly_before_anything_is_written(families, tmp_path):
    import shutil

    from recipes.config import ConfigError

    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    shutil.copy(families["qwen2.5"] / "config.json", no_tok / "config.json")
    with pytest.raises(ConfigError, match=r"model.init_checkpoint: .*no-tokenizer: no tokenizer here"):
        model_tokenizer(ModelConfig(init_checkpoint=str(no_tok)))
    # a tokenizer larger than the model's embedding: the Llama tokenizer on the tiny Qwen2 (384 rows)
    with pytest.raises(ConfigError, match=r"\d+ tokens but the model has 384 embedding rows"):
        model_tokenizer(ModelConfig(tokenizer=str(families["llama3.1"])), 384)
    # a dataset whose columns match no schema: `nrr sft` names the columns, the schemas and the keys; no output
    data = _write(tmp_path / "odd.jsonl", [{"question_text": "1+1", "model_output": "2"}])
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "recipes.sft", "--config", "nemo_configs/sft/tiny_cpu.yaml",
                           f"data.train_path={data}", f"output_dir={run}", "logging.progress=false"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "[model_output, question_text] match no known schema" in proc.stderr
    assert "openr1: problem, generations, correctness_math_verify" in proc.stderr and "`fields`" in proc.stderr
    assert not (run / "checkpoints").exists()


@pytest.mark.vllm
@pytest.mark.slow
def test_nrr_grpo_samples_a_family_model_on_gsm8k_prompts_through_vllm(families, tmp_path, data_root):
    """GRPO on GSM8K train prompts with a Llama-3.1-shaped model: vLLM rollouts with its template, tokenizer and
    its three stop ids (generation_config.json), the rewards graded against GSM8K's `#### N` answers."""
    from transformers import AutoTokenizer

    folder, run = families["llama3.1"], tmp_path / "grpo"
    gsm8k = data_root / "gsm8k" / "train.jsonl"
    cmd = [sys.executable, "-m", "recipes.grpo", "--config", "nemo_configs/grpo/tiny_cpu.yaml",
           f"model.init_checkpoint={folder}", f"prompts.dataset={gsm8k}", "prompts.limit=64", f"output_dir={run}",
           "grpo.steps=2", "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.micro_batch_size=8",
           "grpo.minibatches=2", "rollout.max_tokens=16", "rollout.kv_cache_mb=64", "eval.levels=[]",
           "rewards.weights={accuracy: 1.0, overlong: 1.0}", "checkpoint.every_steps=0", "logging.progress=false",
           "logging.tensorboard=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    assert summary["stop_ids"] == sorted(generation["eos_token_id"]) and len(summary["stop_ids"]) == 3
    prompts = {p["id"]: p for _, p in read_prompts(DatasetSource(str(gsm8k)))}
    reference = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    rollouts = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rollouts] == [1, 2]
    for r in rollouts:
        question = prompts[r["problem_id"]]["problem"]
        assert r["prompt"] == reference.apply_chat_template([{"role": "user", "content": question}],
                                                            add_generation_prompt=True, tokenize=False)
        assert len(r["responses"]) == 4 and all(0.0 >= x >= -1.0 for x in r["rewards"])  # random weights: wrong
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"reward/mean"' in line]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["accuracy"] == 0.0 for m in metrics)
