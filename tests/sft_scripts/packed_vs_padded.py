"""One global batch of the same examples, packed vs padded: print both losses and gradients' norms as JSON.

Run as its own process (megatron's device layer and parallel state are process-wide).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    import torch

    torch.set_num_threads(2)
    from recipes import tokenizer
    from recipes.data import sft_dataset as sd
    from recipes.megatron import providers, runtime, train_step

    runtime.init_distributed(1, 1, seed=0)
    hf = providers.load_hf_config("recipes/assets/models/tiny-qwen2/config.json")
    path = sd.write_records(sd.task_records([1, 2, 3], 8, seed=5), Path(sys.argv[1]) / "corpus.jsonl")
    tok = tokenizer.load()
    examples, _ = sd.load_examples(path, sd.DataConfig(seq_length=128), hf["vocab_size"], tok)  # 24 examples
    chunks = providers.build_model(hf, 1, 1, seed=0)
    out = {"examples": len(examples)}
    # packed: one row per micro batch; padded: 4 rows per micro batch. The loss is a token mean over
    # the whole global batch either way, so both must agree up to float rounding.
    for name, packing, mbs in (("packed", True, 1), ("padded", False, 4)):
        rows = sd.build_rows(examples, 128, packing=packing, pad_id=tok.pad_id)
        micro = sd.micro_batches(rows, mbs)
        for c in chunks:
            c.zero_grad_buffer()
        report = train_step.forward_backward(chunks, micro, 128)
        grads = torch.cat([p.main_grad.flatten() for p in chunks[0].parameters()])
        out[name] = {"rows": len(rows), "loss": report["loss"], "tokens": report["num_tokens"],
                     "grad": grads.tolist()}
    runtime.destroy_distributed()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
