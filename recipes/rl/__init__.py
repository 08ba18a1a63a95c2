"""GRPO building blocks: losses, advantages, rewards, sandbox, rollout backends, weight refit."""
