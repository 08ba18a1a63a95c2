"""Worker for tests/test_megatron_hf.py: HF -> Megatron -> HF for one model family, checked against transformers.

A random transformers model is saved, converted with `import_from_hf`, exported with `export_to_hf`, and the
exported folder is loaded back with `AutoModelForCausalLM`. Writes a JSON report:
  bitwise        exported tensors equal the original HF tensors bit for bit (same names)
  reimport_bitwise  from-hf of the exported folder, exported again, is bitwise identical
  max_logit_diff Megatron logits vs. transformers logits of the exported folder (fp32)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.megatron import hf_checkpoint  # noqa: E402
from recipes.megatron import checkpointing, hf_mapping, providers, runtime  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "recipes/assets/models"


def family_config(name: str) -> dict:
    if name == "qwen3":  # Qwen3: qk-norm, no qkv bias (derived from the tiny qwen2 shape)
        hf = providers.load_hf_config(ASSETS / "tiny-qwen2")
        hf.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=False,
                  tie_word_embeddings=False)
        return hf
    return providers.load_hf_config(ASSETS / f"tiny-{name}")


def main() -> None:
    import transformers

    from recipes import tokenizer

    name, work = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    hf = family_config(name)
    hf["initializer_range"] = 0.1  # peaked logits: greedy decoding has no near-ties
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf), dtype=torch.float32)
    with torch.no_grad():  # norms away from 1.0 so a swapped norm weight cannot go unnoticed
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.add_(torch.rand_like(p) * 0.5)
    ref.save_pretrained(work / "hf_in")
    tokenizer.load().save(work / "hf_in")
    original = hf_mapping.read_hf_weights(work / "hf_in")

    hf_checkpoint.import_from_hf(work / "hf_in", work / "ckpt")
    hf_checkpoint.export_to_hf(work / "ckpt", work / "hf_out")
    exported = hf_mapping.read_hf_weights(work / "hf_out")
    expected = {k: v for k, v in original.items() if k in hf_mapping.hf_weight_names(hf)}
    report = {"bitwise": sorted(exported) == sorted(expected)
              and all(torch.equal(exported[k], expected[k]) for k in expected)}

    hf_checkpoint.import_from_hf(work / "hf_out", work / "ckpt2")
    hf_checkpoint.export_to_hf(work / "ckpt2", work / "hf_out2")
    again = hf_mapping.read_hf_weights(work / "hf_out2")
    report["reimport_bitwise"] = sorted(again) == sorted(exported) and all(torch.equal(again[k], exported[k])
                                                                           for k in exported)

    model = transformers.AutoModelForCausalLM.from_pretrained(work / "hf_out", dtype=torch.float32).eval()
    tokens = torch.randint(0, 262, (2, 300), generator=torch.Generator().manual_seed(1))  # past llama3's 256
    with torch.no_grad():
        hf_logits = model(tokens).logits
    runtime.init_distributed(1, 1)
    chunks = providers.build_model(checkpointing.read_hf_config(work / "ckpt"), 1, 1, ddp=False)
    checkpointing.load_checkpoint(work / "ckpt", chunks)
    meg = providers.unwrap(chunks)[0].eval()
    with torch.no_grad():
        meg_logits = meg(tokens, torch.arange(300).expand(2, 300), None)[..., : hf["vocab_size"]]
    report["max_logit_diff"] = float((meg_logits - hf_logits).abs().max())
    report["logit_scale"] = float(hf_logits.abs().max())
    (work / "report.json").write_text(json.dumps(report))
    runtime.destroy_distributed()


if __name__ == "__main__":
    main()
