"""Worker for the vLLM test in tests/test_megatron_hf.py: an exported folder generates in vLLM like in transformers.

  vllm_generate.py WORK   builds WORK/hf_in (random tiny Qwen2, peaked logits), runs from-hf + to-hf into
                          WORK/hf_out, then greedy-decodes a few chat prompts with vLLM and with transformers and
                          writes WORK/vllm_report.json {"vllm": [[ids]], "hf": [[ids]]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MAX_NEW = 12
PROMPTS = ["What is 3 + 4?", "Compute 12 * 7 - 5.", "Is 91 prime?"]


def build(work: Path) -> Path:
    import torch
    import transformers

    from recipes.megatron import hf_checkpoint
    from recipes.megatron import providers
    from recipes import tokenizer

    hf = providers.load_hf_config(Path(__file__).resolve().parents[2] / "recipes/assets/models/tiny-qwen2")
    hf["initializer_range"] = 0.1
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf), dtype=torch.float32)
    model.save_pretrained(work / "hf_in")
    tokenizer.load().save(work / "hf_in")
    hf_checkpoint.import_from_hf(work / "hf_in", work / "ckpt")
    hf_checkpoint.export_to_hf(work / "ckpt", work / "hf_out")
    return work / "hf_out"


def hf_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=257)
        out.append(y[0, len(ids):].tolist())
    return out


def main() -> None:
    work = Path(sys.argv[1])
    model_dir = build(work)
    from recipes import tokenizer

    prompts = [tokenizer.load().prompt_ids(p) for p in PROMPTS]
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    vllm_ids = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    report = {"vllm": vllm_ids, "hf": hf_greedy(model_dir, prompts)}
    (work / "vllm_report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
