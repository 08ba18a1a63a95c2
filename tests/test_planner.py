"""The memory planner: its parameter, gradient and optimizer bytes equal what megatron-core actually holds per rank
(tiny models, every layout below), its figures for the real models equal a hand computation, its search only
returns layouts that split the model and fit, and a layout that does not fit is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes import planner
from recipes.config import ConfigError, resolve_path
from recipes.megatron.providers import load_hf_config

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
# tiny-qwen2: tied embeddings and qkv bias; tiny-llama3: untied output layer, no bias
LAYOUTS = {
    ("tiny-qwen2", 1): "tp1,tp1-bf16",
    ("tiny-qwen2", 2): "tp2,pp2,dp2,dp2-distopt,tp2-distopt-bf16",
    ("tiny-llama3", 2): "tp2,pp2-distopt,dp2-distopt-bf16",
}
# (nproc, worker script, argv): launched with the other megatron modules' runs (tests/megatron_scripts/run_many.py)
WORKER_RUNS = [(nproc, "held_bytes", ["--config", f"recipes/assets/models/{model}/config.json", "--layouts", layouts,
                                      "--out", f"{{work}}/{model}-{nproc}"])
               for (model, nproc), layouts in LAYOUTS.items()]


def hf(name: str) -> dict:
    return load_hf_config(resolve_path(f"recipes/assets/models/{name}/config.json"))


@pytest.fixture(scope="module")
def held(megatron_workers) -> dict:
    out = {}
    work = megatron_workers[__name__]
    for model, nproc in LAYOUTS:
        for rank in range(nproc):
            for layout, report in json.loads((work / f"{model}-{nproc}.{rank}.json").read_text()).items():
                out[(model, layout, rank)] = report
    return out


@pytest.mark.slow
def test_planned_bytes_equal_the_bytes_each_rank_holds(held):
    expected = {(m, lay, r) for (m, n), lays in LAYOUTS.items() for lay in lays.split(",") for r in range(n)}
    assert set(held) == expected
    for key, report in held.items():
        assert report["names"] == report["planned_names"], key  # the same parameters, names and sizes
        assert report["measured"] == report["planned"], key


@pytest.mark.slow
def test_activations_kept_for_backward_are_the_planned_ones(held):
    """What one forward keeps for backward (summed storages, by dtype) equals the planner's per-layer formula and
    logits term plus what the CPU layers keep beyond it, each named: the K/V heads SDPA sees repeated for GQA on
    CPU (on a GPU the flash kernel reads the shared heads), the RoPE cos/sin cast per use, SDPA's log-sum-exp
    and the norms' inverse RMS in fp32, the final norm's input and output. A layer that kept more (torch's
    composite RMSNorm, eager SwiGLU) breaks the equality."""
    s, b = 16, 2  # the worker's micro batch
    tokens = s * b
    checked = 0
    for (model, layout, rank), report in held.items():
        if report["saved"] is None:  # pipeline stages are not measured
            continue
        h = hf(model)
        tp = int(layout[2]) if layout.startswith("tp") else 1
        nbytes = 2 if "bf16" in layout else 4
        lay = planner.Layout(tp=tp)
        layers, hd = h["num_hidden_layers"], h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]
        nh, nkv = h["num_attention_heads"] // tp, h["num_key_value_heads"] // tp
        per_layer = planner.activation_bytes_per_layer(h, s, b, lay, nbytes) \
            + nbytes * tokens * 2 * (nh - nkv) * hd + nbytes * s * 4 * hd  # repeated K/V heads; cos, sin for q, k
        model_dtype = layers * per_layer + nbytes * tokens * 2 * h["hidden_size"]  # + final norm in/out
        vocab = report["names"][-1][1] // h["hidden_size"] if not h.get("tie_word_embeddings") else \
            report["names"][0][1] // h["hidden_size"]
        fp32 = layers * 4 * tokens * nh + (2 * layers + 1) * 4 * tokens + 4 * tokens * vocab  # lse, 1/rms, logits
        saved = report["saved"]
        got = saved.get("bfloat16", 0) + saved.get("float32", 0)
        assert got == model_dtype + fp32, (model, layout, rank, saved)
        # the planner's logits term: the fp32 copy kept here plus the model-dtype gradient in backward
        assert planner.plan(h, lay, s * b, 1, "bf16" if nbytes == 2 else "fp32").parts["logits"] == \
            tokens * vocab * (nbytes + 4)
        checked += 1
    assert checked >= 6


@pytest.mark.slow
def test_the_distributed_optimizer_shards_adam_state_over_dp(held):
    whole = held[("tiny-qwen2", "dp2", 0)]["measured"]
    for rank in (0, 1):
        shard = held[("tiny-qwen2", "dp2-distopt", rank)]["measured"]
        # each DP rank keeps about half of the Adam state (padding of megatron's buffer aside)
        assert 0.45 * whole["optimizer"] < shard["optimizer"] < 0.55 * whole["optimizer"]
        assert shard["grads"] >= whole["grads"]  # the grad buffer itself stays whole (padded) on every rank
    # bf16 parameters: Adam's two fp32 moments plus fp32 main weights, 12 bytes per owned element
    bf16 = held[("tiny-qwen2", "tp1-bf16", 0)]["measured"]
    assert bf16["optimizer"] == 6 * bf16["params"]


def test_qwen25_7b_by_hand():
    # TP=4 PP=1 DP=4 at 8192 tokens, micro batch 1, no recompute, bf16.
    # one layer: q 3584*3584 + k,v 2*3584*512 + o 3584*3584 + qkv bias 4608 + MLP 3*3584*18944 + norms 7168;
    # per GPU the 7,168 norm weights are whole, the rest / 4; plus embedding + output 2*152064*3584 / 4 + final norm
    per_gpu = 28 * (233_050_624 // 4 + 7_168) + 2 * 152_064 * 3_584 // 4 + 3_584
    assert per_gpu == 1_904_057_344
    layout = planner.Layout(tp=4, dp=4)
    state = planner.state_bytes(hf("qwen2.5-7b"), layout)
    assert state == {"params": 2 * per_gpu, "grads": 4 * per_gpu, "optimizer": 12 * per_gpu}
    # the distributed optimizer keeps a quarter of the 12 bytes per parameter (buffer padding: < 1e-6 of it)
    sharded = planner.state_bytes(hf("qwen2.5-7b"), planner.Layout(tp=4, dp=4, distributed_optimizer=True))
    assert sharded["optimizer"] == pytest.approx(3 * per_gpu, rel=1e-6)
    # activations of one layer: 2 bytes * 8192 tokens * (4h replicated + (q,k,v 36*128 + attn out 28*128 + 3f) / 4)
    act = 2 * 8192 * (4 * 3584 + (36 * 128 + 28 * 128 + 3 * 18944) / 4)
    assert planner.activation_bytes_per_layer(hf("qwen2.5-7b"), 8192, 1, layout) == act
    # sequence parallelism splits the replicated 4h by TP; full recompute keeps only the layer input (h / TP)
    sp = planner.Layout(tp=4, dp=4, sequence_parallel=True)
    assert planner.activation_bytes_per_layer(hf("qwen2.5-7b"), 8192, 1, sp) == act - 2 * 8192 * 3 * 3584
    full = planner.Layout(tp=4, dp=4, sequence_parallel=True, recompute="full")
    assert planner.activation_bytes_per_layer(hf("qwen2.5-7b"), 8192, 1, full) == 2 * 8192 * 3584 / 4
    # without a fused attention kernel the scores and their softmax: 2 * heads * s / TP per token
    eager = planner.activation_bytes_per_layer(hf("qwen2.5-7b"), 8192, 1, layout, flash_attention=False)
    assert eager - act == 2 * 8192 * 2 * 28 * 8192 / 4
    pl = planner.plan(hf("qwen2.5-7b"), layout, 8192, grad_accumulation=8)
    logits = 8192 * 152_064 / 4 * 6  # the loss's fp32 copy (softmax gradient in place) + the bf16 gradient
    assert pl.parts["activations"] == 28 * act and pl.parts["logits"] == logits
    assert pl.total_gib == pytest.approx(46.73, abs=0.05)


def test_pipeline_stages_and_in_flight_micro_batches():
    h = hf("llama3.1-8b")
    # 1F1B: the first of 4 stages keeps 4 micro batches in flight, each with 8 of the 32 layers
    layout = planner.Layout(tp=2, pp=4, dp=1, micro_batch_size=1)
    pl = planner.plan(h, layout, 4096, grad_accumulation=16)
    per_layer = planner.activation_bytes_per_layer(h, 4096, 1, layout)
    first = planner.state_bytes(h, layout, pp_rank=0)
    last = planner.state_bytes(h, layout, pp_rank=3)
    candidates = [sum(first.values()) + 8 * 4 * per_layer,
                  sum(last.values()) + 8 * 1 * per_layer + 4096 * 128_256 / 2 * 6]
    assert pl.total == pytest.approx(max(candidates))
    with pytest.raises(ValueError, match="num_hidden_layers=32"):
        planner.rank_parameters(h, 1, 3)
    with pytest.raises(ValueError, match="num_key_value_heads=8"):
        planner.rank_parameters(h, 16, 1)


def test_search_returns_only_layouts_that_split_the_model_and_fit():
    h = hf("qwen2.5-7b")
    plans = planner.search(h, seq_length=16384, nodes=2, global_batch=128)
    assert plans
    for p in plans[:20]:
        lay = p.layout
        assert lay.world == 16 and 28 % lay.tp == 0 and 4 % lay.tp == 0 and 28 % lay.pp == 0
        assert 128 % (lay.micro_batch_size * lay.dp) == 0
        assert p.total_gib <= 80 * planner.USABLE_FRACTION
        assert p.total == pytest.approx(sum(planner.plan(h, lay, 16384, p.grad_accumulation).parts.values()))
    # nothing fits a 32k-token row of a 7B model on one GPU
    assert planner.search(h, seq_length=32768, nodes=1, gpus_per_node=1, global_batch=8) == []


def test_a_config_that_does_not_fit_is_a_clear_error():
    from recipes.config import load_config
    from recipes.trainer import SFTConfig

    cfg = load_config(SFTConfig, None, ["model.hf_config=recipes/assets/models/qwen2.5-7b/config.json",
                                         "data.seq_length=16384", "training.micro_batch_size=1",
                                         "training.global_batch_size=8", "parallel.dp=8",
                                         "training.precision=bf16"])
    with pytest.raises(ConfigError, match=r"TP1 PP1 CP1 DP8 .* needs .* GiB per GPU at seq 16384"):
        planner.check_fits(cfg)
    table = planner.plan_table(cfg)
    assert "| NO |" in table and "optimizer" in table


def test_model_flops_per_token_by_hand():
    from recipes.metrics import model_flops_per_token, throughput

    # Qwen2.5-7B: per layer q,k,v 3584*36*128 + o 28*128*3584 + MLP 3*3584*18944 = 233,046,016 multiplying
    # parameters; 28 layers + the output layer 152064*3584 = 7,070,285,824; attention 12*28*28*128*4096
    flops = model_flops_per_token(hf("qwen2.5-7b"), 4096)
    assert flops == 6 * 7_070_285_824 + 12 * 28 * 28 * 128 * 4096 == 47_354_216_448
    t = throughput(tokens=8 * 4096, seconds=2.0, gpus=8, flops_per_token=flops, peak_tflops=989.4)
    assert t["tokens_per_s_per_gpu"] == 2048.0
    assert t["model_tflops_per_gpu"] == pytest.approx(2048 * flops / 1e12)
    assert t["mfu"] == pytest.approx(t["model_tflops_per_gpu"] / 989.4)


def test_nrr_plan_searches_a_model_and_checks_a_config(tmp_path, capsys):
    """`nrr plan`: the search for an HF model prints the planner's best layouts in its order; a config's own
    layout that does not fit exits 2 naming the GiB, after printing the layouts that would."""
    from recipes.cli import main

    model = ROOT / "recipes/assets/models/qwen2.5-7b"
    assert main(["plan", "--model", str(model), "--seq-length", "16384", "--nodes", "2", "--top", "3"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| TP")]
    best = planner.search(hf("qwen2.5-7b"), seq_length=16384, nodes=2, global_batch=128)[:3]
    assert [r.split(" | ")[0][2:] for r in rows] == [p.layout.describe() for p in best]
    assert main(["plan", "--model", str(model), "--seq-length", "32768", "--gpus-per-node", "1"]) == 2
    assert "nothing fits" in capsys.readouterr().err

    cfg = tmp_path / "sft.yaml"
    cfg.write_text("model:\n  hf_config: recipes/assets/models/qwen2.5-7b/config.json\ndata:\n  seq_length: 16384\n"
                   "training:\n  micro_batch_size: 1\n  global_batch_size: 8\n  precision: bf16\n"
                   "parallel:\n  dp: 8\n")
    assert main(["plan", "--stage", "sft", "--config", str(cfg), "--top", "2"]) == 2
    out, err = capsys.readouterr()
    assert "| TP1 PP1 CP1 DP8 mbs1 recompute=none | 16384 |" in out and "| NO |" in out
    assert len([r for r in out.splitlines() if r.startswith("| TP") and r.endswith("| yes |")]) == 2
    assert "needs" in err and "GiB per GPU at seq 16384" in err
    assert main(["plan", "--stage", "sft", "--config", str(cfg), "parallel.nodes=2"]) == 2
    assert "8 ranks for 16 GPUs" in capsys.readouterr().err
    assert main(["plan", "no-such-recipe"]) == 2
    assert "no named recipe no-such-recipe" in capsys.readouterr().err
