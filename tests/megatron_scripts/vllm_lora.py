"""Worker for tests/test_lora.py: vLLM generates with a PEFT adapter (LoRARequest on the base) the tokens it
generates with the merged weights.

  vllm_lora.py EXPORT   EXPORT holds base/ (HF base), merged/ (HF, adapters merged) and adapter/ (PEFT), as
                        lora_checks.py --export writes them; greedy-decodes a few prompts both ways and writes
                        EXPORT/vllm_lora.json {"merged": [[ids]], "lora": [[ids]], "base": [[ids]]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MAX_NEW = 12
PROMPTS = ["What is 3 + 4?", "Compute 12 * 7 - 5.", "Is 91 prime?"]


def generate(model_dir: Path, prompts, adapter: Path | None = None) -> dict[str, list[list[int]]]:
    """Greedy tokens of `model_dir` ("plain"), and with `adapter` as a LoRARequest ("lora") in the same engine."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    kwargs = dict(enable_lora=True, max_lora_rank=8, max_loras=1) if adapter is not None else {}
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256, seed=0, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    out = {"plain": [list(o.outputs[0].token_ids) for o in llm.generate(inputs, params)]}
    if adapter is not None:
        request = LoRARequest("adapter", 1, str(adapter))
        out["lora"] = [list(o.outputs[0].token_ids) for o in llm.generate(inputs, params, lora_request=request)]
    del llm
    return out


def main() -> None:
    export = Path(sys.argv[1])
    from recipes import tokenizer

    prompts = [tokenizer.load().prompt_ids(p) for p in PROMPTS]
    on_base = generate(export / "base", prompts, export / "adapter")
    report = {"merged": generate(export / "merged", prompts)["plain"], "lora": on_base["lora"],
              "base": on_base["plain"]}
    (export / "vllm_lora.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
