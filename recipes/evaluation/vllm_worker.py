"""The vLLM side of `VLLMBackend`: run as `python -m recipes.evaluation.vllm_worker '<spec json>'`.

vLLM starts engine processes of its own, so it lives in this process (behind the `__main__` guard),
not in the caller. Protocol: one JSON line per request on stdin ({"prompts", "params"}), one JSON
line per reply on stdout; every log line (ours, vLLM's, its children's) goes to stderr. A request
{"load": <HF folder>} replaces the weights in place (same architecture; the engine runs in this process).
"""

from __future__ import annotations

import json
import os
import sys


def main(spec: dict) -> None:
    # keep the protocol channel private: fd 1 becomes stderr for vLLM and the processes it starts
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        channel.write(json.dumps(obj) + "\n")
        channel.flush()

    try:
        from vllm import LLM, SamplingParams

        from recipes.vllm_batching import generate, prompt_seed

        kwargs = dict(model=spec["model"], dtype=spec["dtype"], enforce_eager=spec["enforce_eager"],
                      seed=spec["seed"], trust_remote_code=False)
        if spec.get("max_model_len"):
            kwargs["max_model_len"] = spec["max_model_len"]
        if spec.get("gpu_memory_utilization") and not spec["enforce_eager"]:
            kwargs["gpu_memory_utilization"] = spec["gpu_memory_utilization"]
        llm = LLM(**kwargs)
        tokenizer = llm.get_tokenizer()
        eos = tokenizer.eos_token_id
        context = llm.llm_engine.model_config.max_model_len
    except Exception as err:  # noqa: BLE001 - reported to the caller, which raises
        reply({"status": "failed", "error": f"{type(err).__name__}: {err}"})
        return
    reply({"status": "ready"})
    for line in sys.stdin:
        try:
            req = json.loads(line)
            if "load" in req:
                load_weights(llm, req["load"])
                reply({"status": "loaded"})
                continue
            p = req["params"]
            # a prompt that fills the context cannot be answered: an empty, truncated sample (vLLM
            # would reject the whole batch)
            lengths = [len(tokenizer.encode(q, add_special_tokens=False)) for q in req["prompts"]]
            fits = [length < context for length in lengths]
            prompts = [q for q, ok in zip(req["prompts"], fits) if ok]
            lengths = [length for length, ok in zip(lengths, fits) if ok]
            params = [SamplingParams(n=p["n"], temperature=p["temperature"], top_p=p["top_p"],
                                     max_tokens=p["max_tokens"], seed=prompt_seed(p["seed"], q, p["n"]),
                                     stop_token_ids=[eos], skip_special_tokens=False) for q in prompts]
            results = iter(generate(llm, prompts, params, lengths, p["n"]))
            empty = [{"text": "", "num_tokens": 0, "finish_reason": "length"}] * p["n"]
            outputs = [
                [{"text": o.text, "num_tokens": len(o.token_ids),
                  "finish_reason": "length" if o.finish_reason == "length" else "stop"} for o in next(results).outputs]
                if ok else empty
                for ok in fits
            ]
            reply({"outputs": outputs})
        except Exception as err:  # noqa: BLE001
            reply({"error": f"{type(err).__name__}: {err}"})


def load_weights(llm, model_dir: str) -> None:
    """The in-place reload GRPO's refit uses (tied embeddings re-tied), then no stale prefix-cache blocks."""
    from pathlib import Path

    from safetensors.torch import load_file

    from recipes.rl.rollout import reload_in_worker

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors")
    weights = [item for f in files for item in load_file(str(f)).items()]
    llm.collective_rpc(reload_in_worker, args=(weights,))
    llm.reset_prefix_cache()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
