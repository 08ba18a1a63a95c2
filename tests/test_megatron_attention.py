"""The local spec's SDPA core attention against megatron-core's own DotProductAttention; a bf16 model's
checkpoint round trip; GRPO's length-sorted micro-batches against one padded batch, and its update that leaves
zero-advantage rows out of the forward pass against the update over every row."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, timeout: int = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_sdpa_attention_matches_megatron_dot_product_attention():
    out = run_python("""
        import torch
        from recipes.megatron import providers, runtime, train_step
        from recipes.megatron.sdpa_attention import SDPADotProductAttention
        runtime.init_distributed(1, 1)
        hf = providers.load_hf_config("recipes/assets/models/tiny-qwen2/config.json")  # 4 heads, 2 KV groups
        model = providers.build_model(hf, 1, 1, seed=3, ddp=False)[0]
        core = [m for m in model.modules() if isinstance(m, SDPADotProductAttention)]
        assert len(core) == hf["num_hidden_layers"], len(core)
        torch.manual_seed(0)
        b, s = 3, 40
        tokens = torch.randint(0, 300, (b, s))
        positions = torch.arange(s).expand(b, s)
        segments = torch.tensor([[0] * 12 + [1] * 20 + [2] * 8, [0] * 40, [0] * 5 + [1] * 35])
        packed = train_step.packed_attention_mask(segments)

        def run(mask):
            model.zero_grad()
            logits = model(tokens, positions, mask)
            (logits.float() ** 2).mean().backward()
            return logits.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])

        applies = SDPADotProductAttention._sdpa_applies
        for name, mask in (("packed", packed), ("causal", None)):
            sdpa = run(mask)
            SDPADotProductAttention._sdpa_applies = lambda self, *a: False  # megatron's own forward
            ref = run(mask)
            SDPADotProductAttention._sdpa_applies = applies
            print(name, float((sdpa[0] - ref[0]).abs().max()), float((sdpa[1] - ref[1]).norm() / ref[1].norm()),
                  float(ref[0].abs().max()))

        # the packed mask reaches SDPA as the float bias SDPA itself makes of a boolean mask, built once per mask
        # (every layer gets the same one) and again after an in-place change
        from torch.nn.functional import scaled_dot_product_attention as F_sdpa
        from recipes.megatron.sdpa_attention import additive_mask
        q, k, v = (torch.randn(b, 4, s, 8) for _ in range(3))
        bias = additive_mask(packed, torch.float32)
        assert additive_mask(packed, torch.float32) is bias
        assert torch.equal(F_sdpa(q, k, v, attn_mask=bias), F_sdpa(q, k, v, attn_mask=~packed))
        packed[0, 0, 13, 12] = True  # the second document's second token no longer sees its first
        rebuilt = additive_mask(packed, torch.float32)
        assert rebuilt is not bias and rebuilt[0, 0, 13, 12] == float("-inf") and bias[0, 0, 13, 12] == 0
        assert torch.equal(F_sdpa(q, k, v, attn_mask=rebuilt), F_sdpa(q, k, v, attn_mask=~packed))
        assert additive_mask(packed, torch.bfloat16).dtype == torch.bfloat16
        print("bias ok")
        """)
    assert "bias ok" in out
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out.splitlines()
            if line.strip() and line != "bias ok"}
    for name in ("packed", "causal"):
        logits_diff, grad_rel, scale = rows[name]
        assert scale > 0.1  # a real signal
        assert logits_diff < 1e-5 and grad_rel < 1e-5, (name, rows[name])


def test_bf16_model_trains_and_checkpoints_round_trip(tmp_path):
    out = run_python(f"""
        import torch
        from recipes.megatron import checkpointing, providers, runtime, train_step
        runtime.init_distributed(1, 1)
        hf = providers.load_hf_config("recipes/assets/models/tiny-qwen2/config.json")
        chunks = providers.build_model(hf, 1, 1, seed=1, dtype=torch.bfloat16)
        print("DTYPES", sorted({{str(p.dtype) for p in chunks[0].parameters()}}))
        opt = train_step.build_optimizer(chunks, lr=1e-3)
        torch.manual_seed(0)
        tokens = torch.randint(0, 300, (2, 32))
        batch = {{"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(2, 32),
                  "position_ids": torch.arange(32).expand(2, 32)}}
        for _ in range(2):
            train_step.optimizer_step(chunks, opt, [batch], 32)
        checkpointing.save_checkpoint("{tmp_path}/ckpt", 2, chunks, opt)
        again = providers.build_model(hf, 1, 1, seed=9, dtype=torch.bfloat16)
        opt2 = train_step.build_optimizer(again, lr=1e-3)
        step, _ = checkpointing.load_checkpoint("{tmp_path}/ckpt", again, opt2)
        same = all(torch.equal(a, b) for a, b in zip(chunks[0].parameters(), again[0].parameters()))
        r1 = train_step.optimizer_step(chunks, opt, [batch], 32)
        r2 = train_step.optimizer_step(again, opt2, [batch], 32)
        print("STEP", step, "SAME", same, "NEXT", r1["loss"] == r2["loss"], r1["loss"])
        """)
    assert "DTYPES ['torch.bfloat16']" in out, out
    assert "STEP 2 SAME True NEXT True" in out, out


# What both GRPO tests start from: a random tiny model, and groups of random responses (lengths, rewards) after one
# 4-token prompt; `grad_after` runs one forward/backward and returns its report and the flattened gradient.
GRPO_SETUP = textwrap.dedent("""
    import torch
    from recipes.grpo import Group, build_batch, full_logprobs, make_loss_fn, rows_to_train, split_rows
    from recipes.megatron import providers, runtime, train_step
    from recipes.rl.losses import LossConfig
    runtime.init_distributed(1, 1)
    hf = providers.load_hf_config("recipes/assets/models/tiny-qwen2/config.json")

    def model_and_batch(model_seed, data_seed, spec):
        chunks = providers.build_model(hf, 1, 1, seed=model_seed)
        g = torch.Generator().manual_seed(data_seed)
        groups = []
        for lengths, rewards in spec:
            responses = [torch.randint(0, 250, (n,), generator=g).tolist() + [259] for n in lengths]
            groups.append(Group(problem={}, prompt=[256, 5, 6, 7], responses=responses,
                                truncated=[False] * 4, rewards=rewards, parts={}))
        return chunks, build_batch(groups, std_normalize=True, pad_id=257)

    def grad_after(chunks, micro, loss_fn):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        rep = train_step.forward_backward(chunks, micro, max(m["tokens"].shape[1] for m in micro), loss_fn=loss_fn)
        return rep, torch.cat([p.main_grad.reshape(-1).clone() for p in chunks[0].parameters()])
""")


def test_grpo_length_sorted_micro_batches_match_one_padded_batch():
    out = run_python(GRPO_SETUP + textwrap.dedent("""
        # very different response lengths
        chunks, batch = model_and_batch(5, 0, [([3, 30, 7, 12], [1.0, 0.0, 0.0, 1.0]),
                                               ([25, 2, 16, 9], [1.0, 0.0, 0.0, 1.0])])
        one = full_logprobs(chunks, batch, mbs=8, same_shape=True)
        sorted_lp = full_logprobs(chunks, batch, mbs=2)
        inside = batch["loss_mask"] > 0
        print("LOGP", float((one - sorted_lp)[inside].abs().max()), float(one[inside].abs().mean()))
        batch["old_logp"] = one
        cfg = LossConfig(variant="grpo", kl_coef=0.0)
        grads = {}
        for name, micro in (("padded", split_rows(batch, list(range(8)), 8, same_shape=True)),
                            ("sorted", split_rows(batch, list(range(8)), 2))):
            # the loss at temperature 0.7 against log-probs at 1.0: ratios away from 1, so the clip takes part
            rep, grads[name] = grad_after(chunks, micro, make_loss_fn(cfg, [], temperature=0.7))
            print(name.upper(), [m["tokens"].shape[1] for m in micro], rep["loss"])
        print("GRAD", float((grads["padded"] - grads["sorted"]).norm() / grads["padded"].norm()))
        """))
    vals = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    diff, scale = map(float, vals["LOGP"])
    assert scale > 0.1 and diff < 1e-5, vals["LOGP"]
    assert vals["PADDED"][0] == "[40]"  # prompt 4 + 30 + eos, rounded up to 8
    sorted_lengths = eval(" ".join(vals["SORTED"][:-1]))
    assert sorted(sorted_lengths) == sorted_lengths and sorted_lengths[0] < 40 and sum(sorted_lengths) < 4 * 40
    assert abs(float(vals["PADDED"][-1]) - float(vals["SORTED"][-1])) < 1e-5
    assert float(vals["GRAD"][0]) < 1e-4


def test_grpo_update_without_zero_advantage_rows_matches_the_full_update():
    out = run_python(GRPO_SETUP + textwrap.dedent("""
        chunks, batch = model_and_batch(7, 1, [([3, 30, 7, 12], [1.0, 0.0, 0.0, 1.0]),
                                               ([25, 2, 16, 9], [0.0, 0.0, 0.0, 0.0]),
                                               ([5, 11, 4, 20], [1.0, 1.0, 1.0, 1.0]),
                                               ([8, 6, 14, 3], [0.0, 1.0, 0.0, 0.0])])
        rows = list(range(16))
        batch["old_logp"] = full_logprobs(chunks, batch, mbs=4, temperature=0.7)
        for variant in ("grpo", "dapo", "dr_grpo"):
            cfg = LossConfig(variant=variant, kl_coef=0.0, max_response_tokens=32)
            kept, idle = rows_to_train(batch, rows, cfg)
            runs = {"all": split_rows(batch, rows, 4)}
            # the shortcut: only rows with a gradient, scored by their own forward pass (no old log-probs at all)
            short = dict(batch, old_logp=torch.full_like(batch["old_logp"], float("nan")))
            runs["kept"] = split_rows(short, kept, 4)
            runs["kept"][0]["idle_denominator"] = torch.tensor(idle)
            for m in runs["kept"]:
                m["on_policy"] = torch.tensor(True)
            grads = {}
            for name, micro in runs.items():
                rep, grads[name] = grad_after(chunks, micro, make_loss_fn(cfg, [], temperature=0.7))
                print(variant, name, len(micro), rep["loss"], rep["num_tokens"])
            print(variant, "GRAD", float((grads["all"] - grads["kept"]).norm() / grads["all"].norm()), len(kept), idle)
        """))
    seen = set()
    for variant in ("grpo", "dapo", "dr_grpo"):
        rows = {line.split()[1]: line.split()[2:] for line in out.splitlines() if line.startswith(variant + " ")}
        # 8 rows of the two all-equal groups are left out; the denominator still counts them
        assert rows["all"][0] == "4" and rows["kept"][0] == "2", rows
        assert rows["GRAD"][1] == "8" and float(rows["GRAD"][2]) > 0
        assert abs(float(rows["all"][1]) - float(rows["kept"][1])) < 1e-6 and rows["all"][2] == rows["kept"][2]
        assert float(rows["GRAD"][0]) < 1e-5, rows
        seen.add(rows["all"][2])
    assert len(seen) == 2  # sequences (grpo, dr_grpo: 16) and tokens (dapo) are different denominators


def test_attention_keeps_full_precision_when_matmuls_run_in_bf16():
    """With `matmul_precision: medium` the linear layers' float32 matmuls may use bf16 products; the CPU attention
    kernel must not: its output and gradients equal a run at "highest" bit for bit, while a plain matmul moves."""
    import torch
    import torch.nn.functional as F

    from recipes.megatron.sdpa_attention import sdpa

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 48, 32, generator=gen) for _ in range(3))
    mask = torch.ones(48, 48, dtype=torch.bool).tril().expand(2, 1, 48, 48).clone()
    mask[1, :, :, :10] = False  # a packed second sequence in row 1
    mask[1, :, :10, :10] = torch.ones(10, 10, dtype=torch.bool).tril()

    def run(attn, **kw):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attn(*leaves, **kw)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    old = torch.get_float32_matmul_precision()
    try:
        for kw in ({"attn_mask": mask}, {"is_causal": True}):
            torch.set_float32_matmul_precision("highest")
            ref = run(F.scaled_dot_product_attention, **kw)
            plain = q[0, 0] @ k[0, 0].T
            torch.set_float32_matmul_precision("medium")
            guarded = run(sdpa, **kw)
            with torch.no_grad():
                no_grad = sdpa(q, k, v, **kw)
            assert all(torch.equal(a, b) for a, b in zip(guarded, ref)), kw
            assert torch.equal(no_grad, ref[0]), kw
            assert torch.get_float32_matmul_precision() == "medium"  # restored after forward and backward
        if torch.backends.mkldnn.is_available() and torch.cpu._is_amx_tile_supported():
            assert not torch.equal(q[0, 0] @ k[0, 0].T, plain)  # the setting is live: bf16 products differ
    finally:
        torch.set_float32_matmul_precision(old)
