"""The megatron-core engine shared by every training stage.

- `runtime`: torch.distributed + megatron parallel state + seeding, and the CPU device layer.
- `providers`: HF config.json -> megatron-core GPTModel chunks (Qwen2/2.5, Qwen3, Llama 3).
- `train_step`: one forward/backward over micro-batches (1F1B on PP), token log-probs, TP-aware logits helpers.
- `hf_mapping`: THE HF <-> Megatron weight mapping (conversion and weight refit into vLLM).
- `checkpointing`: dist_checkpointing save/load with keep-last-K, an atomic `latest` marker, resharding.
"""
