"""Named SFT recipes: complete configs, layouts that fit an 80 GiB H100, and a memory estimate that
matches a hand computation."""

import pytest

from recipes.config import ConfigError, load_config
from recipes.megatron.providers import load_hf_config
from recipes.named_recipes import (NAMED_RECIPES, estimate_memory, llama31_8b_sft, param_counts, qwen25_7b_sft)
from recipes.trainer import SFTConfig, resolve_batch, resolve_path

GIB = 1024**3


@pytest.mark.parametrize("name, total", [("qwen2.5-1.5b", 1_543_714_304), ("qwen2.5-7b", 7_615_616_512),
                                         ("llama3.1-8b", 8_030_261_248)])
def test_architectures_have_the_published_parameter_counts(name, total):
    hf = load_hf_config(resolve_path(f"recipes/assets/models/{name}/config.json"))
    c = param_counts(hf)
    assert c["embedding"] + c["output"] + c["final_norm"] + hf["num_hidden_layers"] * c["layer"] == total


@pytest.mark.parametrize("name", sorted(NAMED_RECIPES))
@pytest.mark.parametrize("nodes", [1, 2, 4, 8])
def test_every_named_recipe_fits_an_h100(name, nodes):
    cfg = NAMED_RECIPES[name](nodes=nodes)
    p = cfg.parallel
    assert p.tp * p.pp * p.dp == 8 * nodes and p.tp <= 8
    rows, grad_acc = resolve_batch(cfg)
    assert rows % (cfg.training.micro_batch_size * p.dp) == 0 and grad_acc >= 1
    mem = estimate_memory(cfg)
    assert 0 < mem["total_gib"] < 80.0, mem


def test_memory_estimate_of_qwen25_7b_by_hand():
    # Qwen2.5-7B, 2 nodes: TP=4, PP=1, DP=4, seq 8192, micro batch 1; Adam states on every DP rank (the
    # trainer's optimizer is not distributed, so the estimate must not divide them by DP).
    # one layer: q 3584*3584 + k,v 2*3584*512 + o 3584*3584 + qkv bias 4608 + MLP 3*3584*18944 + norms 7168
    #          = 233,057,792 params, of which the 7,168 norm weights are replicated across TP
    # per GPU: 28 * (233,050,624 / 4 + 7,168) + (embedding + output) 2*152064*3584 / 4 + final norm 3584
    per_gpu = 28 * (233_050_624 // 4 + 7_168) + 2 * 152_064 * 3_584 // 4 + 3_584
    assert per_gpu == 1_904_057_344
    # activations per layer: 2 bytes * 8192 tokens * (4h replicated + (q,k,v 36*128 + attn out 28*128 + 3f) / 4)
    act_layer = 2 * 8192 * (4 * 3584 + (36 * 128 + 28 * 128 + 3 * 18944) / 4)
    logits = 8192 * 152_064 / 4 * 10  # bf16 logits + fp32 copy + fp32 softmax gradient
    expected = {"params_gib": per_gpu * 2 / GIB, "grads_gib": per_gpu * 4 / GIB, "adam_gib": per_gpu * 12 / GIB,
                "activations_gib": (28 * act_layer + logits) / GIB}
    mem = estimate_memory(qwen25_7b_sft(nodes=2))
    for key, value in expected.items():
        assert mem[key] == pytest.approx(value, rel=1e-3), key
    assert mem["total_gib"] == pytest.approx(47.89, abs=0.05)
    # at TP=2 the replicated Adam states alone take 42.5 GiB: that layout does not fit an 80 GiB H100
    assert estimate_memory(qwen25_7b_sft(nodes=2, tp=2))["total_gib"] > 80.0


def test_named_yaml_files_load_and_match_their_factories():
    for path, factory, nodes in (("nemo_configs/sft/qwen2.5-7b_h100.yaml", qwen25_7b_sft, 2),
                                 ("nemo_configs/sft/llama3.1-8b_h100.yaml", llama31_8b_sft, 2)):
        cfg = load_config(SFTConfig, resolve_path(path))
        expected = factory(nodes=nodes, train_path=cfg.data.train_path)
        assert cfg == expected


def test_batch_settings_are_checked():
    cfg = load_config(SFTConfig, None, ["training.global_batch_size=null", "training.global_batch_tokens=4096",
                                         "data.seq_length=128", "training.micro_batch_size=8"])
    assert resolve_batch(cfg) == (32, 4)
    cfg = load_config(SFTConfig, None, ["training.global_batch_size=null", "training.grad_accumulation=3",
                                         "parallel.dp=2", "training.micro_batch_size=4"])
    assert resolve_batch(cfg) == (24, 3)
    with pytest.raises(ConfigError, match="not divisible by micro_batch_size"):
        resolve_batch(load_config(SFTConfig, None, ["training.global_batch_size=30", "training.micro_batch_size=8"]))
    with pytest.raises(ConfigError, match="exactly one of"):
        resolve_batch(load_config(SFTConfig, None, ["training.global_batch_tokens=4096"]))
