"""GRPO (and the Dr.GRPO / DAPO variants) on megatron-core with vLLM rollouts.

    nrr grpo --config nemo_configs/grpo/tiny_cpu.yaml loss.variant=dapo parallel.tp=2
    nrr grpo rejection-sample --config nemo_configs/grpo/tiny_cpu.yaml

One step: sample prompts -> the rollout engine generates G responses per prompt -> rewards ->
group-relative advantages -> (DAPO: drop all-equal groups, refill) -> behaviour (and reference)
log-probs recomputed by the trainer -> several clipped policy-gradient updates -> refit the new
weights into the engine in memory -> log, checkpoint. The engine lives on rank 0; the other ranks
(TP/PP/DP as in SFT) receive the rollouts by broadcast.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

from recipes import task
from recipes.config import ConfigError, resolve_path, save_config
from recipes.distillation import (DistillConfig, check_distill, kl_coef_at, kl_rows, on_policy_advantages,
                                  teacher_topk, topk_kl, vocab_parallel_select)
from recipes.generation.backend import SamplingParams
from recipes.megatron.lora import PeftConfig, check_config as check_lora
from recipes.rl.advantages import group_advantages, informative_groups
from recipes.rl.losses import LossConfig, policy_loss, reduce_loss
from recipes.rl.rejection_sampling import RejectionConfig
from recipes.rl.rewards import RewardsConfig, Sample, check_weights, score
from recipes.rl.rollout import RolloutConfig
from recipes.stages import STAGES
from recipes.trainer import (CheckpointConfig, LoggingConfig, ModelConfig, OptimizerConfig, ParallelConfig,
                             check_parallel, run_stage)

HELP = STAGES["grpo"].help
DEFAULT_CONFIG = STAGES["grpo"].default_config


# ------------------------------------------------------------------------------ config


@dataclasses.dataclass
class PromptsConfig:
    # a prompt set (file or folder: GSM8K, MATH, a code set with tests; recipes.data.schemas); None: the embedded task
    dataset: str | None = None
    schema: str = "auto"  # the dataset's schema (gsm8k, math, code, prompt)
    fields: dict[str, str] = dataclasses.field(default_factory=dict)  # schema field -> the dataset's column
    limit: int | None = None  # the dataset's first N prompts
    levels: list[int] = dataclasses.field(default_factory=lambda: [2, 3])  # embedded task: where SFT sometimes succeeds
    level_weights: list[float] | None = None  # embedded task: mix of levels (default: uniform)
    pool_per_level: int = 2000  # embedded task: train-split problems per level to sample from
    seed: int = 0


@dataclasses.dataclass
class GRPOSettings:
    steps: int = 20
    prompts_per_step: int = 8
    group_size: int = 8  # G responses per prompt
    minibatches: int = 2  # optimizer steps per pass over the batch
    epochs: int = 1  # passes over each batch (updates per batch = minibatches * epochs)
    micro_batch_size: int = 16
    std_normalize: bool = True  # GRPO/DAPO: A = (r - mean) / std; Dr.GRPO: A = r - mean
    dynamic_sampling: bool = False  # DAPO: drop groups with all-equal rewards and refill
    max_refill_rounds: int = 4
    max_minutes: float | None = None  # stop early (after a whole step) once the loop has run this long


@dataclasses.dataclass
class HeldoutConfig:
    every_steps: int = 0  # 0: only before and after training
    # an evaluation benchmark (embedded, gsm8k, math500, ...; recipes/evaluation/benchmarks.py) with its prompt
    benchmark: str = "embedded"
    levels: list[int] = dataclasses.field(default_factory=lambda: [2, 3])  # embedded: [] skips the check
    per_level: int = 100  # embedded: problems per level; another benchmark: its first `per_level` problems
    temperature: float = 0.0  # 0: greedy; > 0: pass@1 as the mean over `samples` sampled responses (R1's protocol)
    samples: int = 1


@dataclasses.dataclass
class GRPOConfig:
    output_dir: str = "runs/grpo"
    mode: str = "train"  # train | rejection_sample
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    # the batch is grpo.prompts_per_step x grpo.group_size; the length grpo.steps
    training: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
        lr=1e-5, min_lr=1e-5, warmup_steps=0, weight_decay=0.0))
    grpo: GRPOSettings = dataclasses.field(default_factory=GRPOSettings)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    rewards: RewardsConfig = dataclasses.field(default_factory=RewardsConfig)
    prompts: PromptsConfig = dataclasses.field(default_factory=PromptsConfig)
    eval: HeldoutConfig = dataclasses.field(default_factory=HeldoutConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=lambda: CheckpointConfig(every_steps=0))
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    rejection: RejectionConfig = dataclasses.field(default_factory=RejectionConfig)
    # a teacher: on-policy distillation (its per-token log-probs as advantages, or a KL on its top-k tokens) or
    # KDRL (GRPO + KL to it)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    # LoRA on a frozen policy base: the refit sends the rollout engine the merged weights
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)


def check_config(cfg: GRPOConfig) -> None:
    if cfg.mode not in ("train", "rejection_sample"):
        raise ConfigError(f"mode must be 'train' or 'rejection_sample', got {cfg.mode!r}")
    check_parallel(cfg.parallel)
    check_lora(cfg.peft.lora)
    g = cfg.grpo
    rows = g.prompts_per_step * g.group_size
    per_update = rows // max(g.minibatches, 1)
    if rows % g.minibatches or per_update % (g.micro_batch_size * cfg.parallel.dp):
        raise ConfigError(f"grpo: prompts_per_step*group_size={rows} rows must split into minibatches={g.minibatches} "
                          f"of a multiple of micro_batch_size*dp={g.micro_batch_size}*{cfg.parallel.dp}")
    if cfg.rollout.temperature <= 0:
        raise ConfigError(f"rollout.temperature={cfg.rollout.temperature}: GRPO needs sampled responses (> 0)")
    if g.group_size < 2:
        raise ConfigError("grpo.group_size must be >= 2 (advantages are relative to the group)")
    if cfg.prompts.level_weights is not None and len(cfg.prompts.level_weights) != len(cfg.prompts.levels):
        raise ConfigError("prompts.level_weights must have one weight per entry of prompts.levels")
    if cfg.loss.variant == "dr_grpo" and cfg.loss.max_response_tokens not in (None, cfg.rollout.max_tokens):
        raise ConfigError(f"loss.max_response_tokens={cfg.loss.max_response_tokens} should equal rollout.max_tokens="
                          f"{cfg.rollout.max_tokens} (Dr.GRPO's constant normaliser is the generation budget)")
    try:
        check_weights(cfg.rewards)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_distill(cfg.distill, cfg.rollout.temperature)
    if (cfg.distill.teacher or cfg.distill.teacher_url) and cfg.distill.mode == "kdrl" and cfg.loss.kl_coef > 0:
        raise ConfigError("loss.kl_coef (KL to the starting policy) and distill.mode=kdrl (KL to the teacher) "
                          "share the loss's one KL term: set loss.kl_coef=0 or use on_policy")
    if cfg.distill.teacher and cfg.distill.mode == "topk" and cfg.parallel.pp > 1:
        raise ConfigError(f"distill.mode=topk runs without pipeline parallelism: parallel.pp={cfg.parallel.pp} "
                          "(use parallel.pp=1, or distill.mode=on_policy)")


# ------------------------------------------------------------------------------ prompts and rollouts


def read_prompt_set(cfg: PromptsConfig) -> list[dict]:
    """Prompts as {id, problem, answer, tests, level}: the embedded task's train split, or a prompt dataset."""
    if cfg.dataset is None:
        return [{**p.to_dict(), "tests": None} for lvl in cfg.levels
                for p in task.generate(lvl, cfg.pool_per_level, seed=cfg.seed)]
    from recipes.data.schemas import DatasetSource, read_prompts

    out = []
    source = DatasetSource(str(resolve_path(cfg.dataset)), schema=cfg.schema, fields=dict(cfg.fields))
    for _, p in read_prompts(source):
        if cfg.limit is not None and len(out) >= cfg.limit:
            break
        out.append({"id": p["id"], "problem": p["problem"], "answer": p["reference"], "tests": p.get("tests"),
                    "level": None})
    if not out:
        raise ConfigError(f"prompts.dataset: {cfg.dataset} holds no prompts")
    return out


class PromptSampler:
    """Prompts for (step, refill round) as a pure function of the seed: resuming at step k replays step k."""

    def __init__(self, cfg: PromptsConfig):
        self.cfg = cfg
        prompts = read_prompt_set(cfg)
        self.pools = {lvl: [p for p in prompts if p["level"] == lvl] for lvl in cfg.levels} \
            if cfg.dataset is None else {None: prompts}

    def batch(self, step: int, n: int, round_: int = 0) -> list[dict]:
        rng = random.Random(f"{self.cfg.seed}:{step}:{round_}")
        if self.cfg.dataset is not None:
            return [rng.choice(self.pools[None]) for _ in range(n)]
        levels = rng.choices(self.cfg.levels, weights=self.cfg.level_weights, k=n)
        return [rng.choice(self.pools[lvl]) for lvl in levels]


@dataclasses.dataclass
class Group:
    problem: dict
    prompt: list[int]
    responses: list[list[int]]
    truncated: list[bool]
    rewards: list[float]
    parts: dict[str, list[float]]
    engine_logprobs: list[list[float]] | None = None  # per response, the engine's log-prob of each sampled token


def rollout_groups(backend, tokenizer, problems: list[dict], cfg: GRPOConfig, seed: int) -> list[Group]:
    """G sampled responses per problem, scored by the weighted rewards."""
    prompts = [tokenizer.prompt_ids(p["problem"]) for p in problems]
    outs = backend.generate(prompts, cfg.rollout.sampling(cfg.grpo.group_size, seed))
    groups = []
    for p, prompt, completions in zip(problems, prompts, outs):
        samples = [Sample(tokenizer.response_text(c.text), p["answer"], len(c.token_ids), c.truncated,
                          tests=p.get("tests"), problem=p["problem"]) for c in completions]
        rewards, parts = score(samples, cfg.rewards)
        engine_lp = [c.logprobs for c in completions]
        groups.append(Group(p, prompt, [c.token_ids for c in completions],
                            [c.truncated for c in completions], rewards, parts,
                            engine_lp if all(lp is not None for lp in engine_lp) else None))
    return groups


def sample_step(backend, tokenizer, sampler: PromptSampler, cfg: GRPOConfig,
                step: int) -> tuple[list[Group], dict]:
    """One step's groups; with dynamic sampling, all-equal groups are dropped and more prompts drawn."""
    g = cfg.grpo
    kept: list[Group] = []
    seen: list[Group] = []
    for round_ in range(g.max_refill_rounds + 1 if g.dynamic_sampling else 1):
        problems = sampler.batch(step, g.prompts_per_step, round_)
        groups = rollout_groups(backend, tokenizer, problems, cfg,
                                seed=cfg.training.seed * 100_003 + step * 101 + round_)
        seen += groups
        if not g.dynamic_sampling:
            kept = groups
            break
        mask = informative_groups(torch.tensor([gr.rewards for gr in groups])).tolist()
        kept += [gr for gr, keep in zip(groups, mask) if keep]
        if len(kept) >= g.prompts_per_step:
            break
    if g.dynamic_sampling and len(kept) < g.prompts_per_step:  # not enough signal: top up with the last groups
        kept += [gr for gr in seen if gr not in kept][: g.prompts_per_step - len(kept)]
    stats = {"groups_sampled": len(seen), "groups_informative": int(informative_groups(
        torch.tensor([gr.rewards for gr in seen])).sum())}
    return kept[: g.prompts_per_step], stats


# ------------------------------------------------------------------------------ batch and loss


def build_batch(groups: list[Group], std_normalize: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows prompt+response padded to one length; loss_mask marks positions whose next token is a response token."""
    adv = group_advantages(torch.tensor([gr.rewards for gr in groups], dtype=torch.float32), std_normalize)
    rows = [(gr.prompt, resp) for gr in groups for resp in gr.responses]
    s = max(len(p) + len(r) for p, r in rows)
    s = (s + 7) // 8 * 8
    tokens = torch.full((len(rows), s), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), s)
    for i, (p, r) in enumerate(rows):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = 1.0
    labels = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    out = {"tokens": tokens, "labels": labels, "loss_mask": mask, "adv": adv.reshape(-1),
           "position_ids": torch.arange(s).expand(len(rows), s).contiguous()}
    if all(gr.engine_logprobs is not None for gr in groups):  # aligned with labels, like the trainer's log-probs
        engine = torch.zeros(len(rows), s)
        lps = [lp for gr in groups for lp in gr.engine_logprobs]
        for i, ((p, r), lp) in enumerate(zip(rows, lps)):
            engine[i, len(p) - 1:len(p) + len(r) - 1] = torch.tensor(lp, dtype=torch.float32)
        out["engine_logp"] = engine
    return out


def distill_gap(teacher_logp: torch.Tensor, batch: dict) -> dict:
    """The sampled-token estimate of KL(student || teacher) per response token (what on-policy distillation
    lowers), from the student's log-probs before this step's updates."""
    inside = batch["loss_mask"] > 0
    gap = (batch["old_logp"] - teacher_logp)[inside]
    return {"distill/reverse_kl": float(gap.mean()) if gap.numel() else 0.0}


def make_loss_fn(cfg: LossConfig, stats: list, temperature: float = 1.0, distill: DistillConfig | None = None):
    """The megatron `loss_fn(logits, batch) -> (loss_sum, denominator)` of the chosen variant.

    The logits are divided by the sampling temperature: the policy being optimised is the distribution the
    rollouts were drawn from (its greedy answer is the same at every temperature). A batch with the teacher's
    top-k (`topk_ids`, `topk_logp`) adds distill.coef x the top-k KL of each response token, aggregated as the
    variant aggregates tokens.
    """
    from recipes.megatron import train_step

    def loss_fn(logits, batch):
        if temperature != 1.0:
            logits = logits / temperature
        logp = train_step.vocab_parallel_log_probs(logits, batch["labels"])
        # outside the mask the policy is compared with itself: those columns may hold no computed log-prob (0),
        # and exp(ref - logp) of one could overflow to inf, which the mask's 0 would turn into NaN
        inside = batch["loss_mask"] > 0
        # rows of an update made before any other from this batch are scored by this forward pass itself
        fresh = ~inside | batch["on_policy"] if "on_policy" in batch else ~inside
        old = torch.where(fresh, logp.detach(), batch["old_logp"])
        # KDRL's reward-guided masking: rows outside kl_rows are compared with themselves (a zero KL term)
        kl_inside = inside & batch["kl_rows"][:, None] if "kl_rows" in batch else inside
        ref = None if batch.get("ref_logp") is None else torch.where(kl_inside, batch["ref_logp"], logp.detach())
        # the engine's log-probs of the sampled tokens: mismatch telemetry, and the TIS weights with loss.tis_cap
        engine = None if batch.get("engine_logp") is None else torch.where(inside, batch["engine_logp"], old)
        loss_sum, denom, micro_stats = policy_loss(logp, old, batch["adv"], batch["loss_mask"], cfg, ref, engine)
        if "topk_ids" in batch:
            kl = topk_kl(vocab_parallel_select(logits, batch["topk_ids"]), batch["topk_logp"], distill)
            loss_sum = loss_sum + distill.coef * reduce_loss(kl, batch["loss_mask"], cfg)[0]
            micro_stats["topk_kl_sum"] = float((kl.detach() * batch["loss_mask"]).sum())
        with torch.no_grad():
            shard_logp = train_step.vocab_parallel_log_softmax(logits.detach())
            ent = -train_step.tp_sum((shard_logp.exp() * shard_logp).sum(-1))
            micro_stats["entropy_sum"] = float((ent * batch["loss_mask"]).sum())
        stats.append(micro_stats)
        if "idle_denominator" in batch:  # rows left out of the forward pass still count in the average
            denom = denom + batch["idle_denominator"]
        return loss_sum, denom

    return loss_fn


def response_ends(loss_mask: torch.Tensor) -> list[int]:
    """Per row, the columns a forward pass needs: up to the last response token's label, rounded up to 8."""
    ends = []
    for row in loss_mask:
        hit = row.nonzero()
        end = int(hit[-1]) + 2 if len(hit) else 8
        ends.append(min((end + 7) // 8 * 8, loss_mask.shape[1]))
    return ends


def split_rows(batch: dict, rows: list[int], mbs: int, same_shape: bool = False) -> list[dict]:
    """Micro-batches of `rows`, shortest responses together, each cut to its longest row: padding to the batch's
    longest response costs ~half the forward and backward compute when lengths vary. `same_shape` cuts all to the
    longest of `rows` (pipeline parallelism sends one activation shape between stages). Which micro-batch a row
    lands in does not change the loss: megatron sums loss and token counts over micro-batches."""
    ends = response_ends(batch["loss_mask"][rows])
    by_length = sorted(range(len(rows)), key=lambda i: ends[i])
    out = []
    for i in range(0, len(rows), mbs):
        part = by_length[i:i + mbs]
        extent = max(ends) if same_shape else max(ends[j] for j in part)
        idx = [rows[j] for j in part]
        out.append({k: v[idx, :extent] if v.dim() >= 2 else v[idx] for k, v in batch.items()})
    return out


def rows_to_train(batch: dict, rows: list[int], cfg: LossConfig) -> tuple[list[int], float]:
    """The rows of `rows` whose loss has a gradient, and the loss denominator of the others.

    Without a KL term a row whose advantage is 0 (every row of a group whose responses all scored the same) adds 0
    to the loss and to the gradient, yet counts in the variant's denominator. Leaving it out of the forward and
    backward passes and adding its denominator gives the same update for a fraction of the compute. One row is
    always kept: the optimizer steps either way (Adam's moments move the weights with a zero gradient too).
    """
    if cfg.kl_coef > 0 or not rows:
        return rows, 0.0
    keep = [r for r in rows if float(batch["adv"][r].abs().sum()) != 0.0] or rows[:1]
    idle = sorted(set(rows) - set(keep))
    if not idle:
        return keep, 0.0
    mask = batch["loss_mask"][idle]
    return keep, float(reduce_loss(torch.zeros_like(mask), mask, cfg)[1])


def full_topk(chunks, batch: dict, mbs: int, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k (log-probs, ids) [B, S, k] aligned with `labels`, over the micro-batches of
    `full_logprobs` (zeros past each micro-batch's extent, outside every loss mask)."""
    n, s = batch["tokens"].shape
    logp, ids = None, None
    for micro in split_rows({"tokens": batch["tokens"], "loss_mask": batch["loss_mask"],
                             "row": torch.arange(n)}, list(range(n)), mbs):
        extent = micro["tokens"].shape[1]
        lp, ix = teacher_topk(chunks, micro["tokens"], k, temperature)
        if logp is None:  # k may be cut to the vocabulary's size
            logp, ids = torch.zeros(n, s, lp.shape[-1]), torch.zeros(n, s, lp.shape[-1], dtype=torch.long)
        logp[micro["row"], :extent - 1], ids[micro["row"], :extent - 1] = lp, ix
    return logp, ids


def endpoint_logprobs(endpoint, groups: list[Group], batch: dict) -> torch.Tensor:
    """The endpoint teacher's log-probs of every row's tokens, aligned with `labels` like `full_logprobs`: asked
    by rank 0 (the one holding `endpoint`), broadcast to the others."""
    from recipes.distillation import endpoint_teacher_logprobs

    shared = [None]
    if endpoint is not None:
        shared[0] = endpoint_teacher_logprobs(endpoint, [gr.prompt + r for gr in groups for r in gr.responses],
                                              batch["tokens"].shape[1])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(shared, src=0)
    return shared[0]


def full_logprobs(chunks, batch: dict, mbs: int, temperature: float = 1.0, same_shape: bool = False,
                  rows: list[int] | None = None) -> torch.Tensor:
    """[B, S] log p(labels) aligned with `labels`, over length-sorted micro-batches as in `split_rows` (0 past each
    micro-batch's extent and in the last column, outside every loss mask); only `rows` when given (others 0)."""
    from recipes.megatron import train_step

    n, s = batch["tokens"].shape
    out = torch.zeros(n, s)
    if same_shape:  # one forward-only schedule over all rows (every micro-batch the same shape)
        out[:, :-1] = train_step.logprobs_of(chunks, batch["tokens"], micro_batch_size=mbs, temperature=temperature)
        return out
    rows = list(range(n)) if rows is None else rows
    if not rows:
        return out
    for micro in split_rows({"tokens": batch["tokens"], "loss_mask": batch["loss_mask"],
                             "row": torch.arange(n)}, rows, mbs):
        extent = micro["tokens"].shape[1]
        lp = train_step.logprobs_of(chunks, micro["tokens"], temperature=temperature)
        out[micro["row"], :extent - 1] = lp
    return out


# ------------------------------------------------------------------------------ evaluation


def heldout_accuracy(backend, tokenizer, cfg: HeldoutConfig, max_tokens: int) -> dict[str, float]:
    """pass@1 on a held-out benchmark (per level for the embedded task's fixed split), through the rollout engine
    on rank 0, with the evaluation's own problems, prompts, records and metrics: greedy, or the mean over
    `cfg.samples` responses sampled at `cfg.temperature`."""
    from recipes.evaluation.benchmarks import load_benchmark
    from recipes.evaluation.config import BenchmarkConfig
    from recipes.evaluation.metrics import accuracy_metrics
    from recipes.evaluation.prompts import default_prompt, messages
    from recipes.evaluation.runner import build_record

    if cfg.benchmark == "embedded" and not cfg.levels:  # no held-out check
        return {}
    n = cfg.samples if cfg.temperature > 0 else 1
    expect_thinking = True in tokenizer.thinking_modes
    if cfg.benchmark == "embedded":  # one score per level
        parts = {f"L{lvl}": BenchmarkConfig(name="embedded", levels=[lvl], n_per_level=cfg.per_level)
                 for lvl in cfg.levels}
    else:
        parts = {cfg.benchmark: BenchmarkConfig(name=cfg.benchmark, limit=cfg.per_level)}
    out = {}
    for key, bench in parts.items():
        problems = load_benchmark(bench)
        prompts = [tokenizer.render(messages(p["problem"], default_prompt(bench.name)), add_generation_prompt=True)
                   for p in problems]
        comps = backend.generate(prompts, SamplingParams(n=n, temperature=cfg.temperature, max_tokens=max_tokens,
                                                         seed=0))
        records = [build_record(p, i, c, expect_thinking, backend.count_tokens, 5.0, tokenizer)
                   for p, group in zip(problems, comps) for i, c in enumerate(group)]
        out[key] = accuracy_metrics(records)["pass@1"]
    out["mean"] = sum(out.values()) / len(out)
    return out


def plot_reward_curve(run_dir: Path) -> Path | None:
    from recipes.metrics import read_metrics

    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "reward/mean" in r]
    if not train_rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values: list[float], window: int = 10) -> list[float]:  # a batch of 16 prompts is noisy
        return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                for i in range(len(values))]

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in train_rows]
    series = [("reward", [r["reward/mean"] for r in train_rows], "C0")]
    accuracy = [r.get("accuracy", float("nan")) for r in train_rows]
    if accuracy != series[0][1]:  # with the accuracy reward alone the two curves are one
        series.append(("accuracy", accuracy, "C1"))
    for name, values, color in series:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(values), color=color, label=f"{name} (train batch, mean of 10 steps)")
    evals = [r for r in rows if "eval/mean" in r]
    for i, key in enumerate(sorted({k for r in evals for k in r if k.startswith("eval/")})):
        ax.plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r],
                "o-" if key == "eval/mean" else "o--", color=f"C{i + 2}", label=f"held-out {key[5:]} (pass@1)")
    ax.set_xlabel("GRPO step")
    ax.legend()
    ax.grid(alpha=0.3)
    out = run_dir / "report" / "reward_curve.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------ the loop


def train(cfg: GRPOConfig) -> dict:
    from megatron.core import parallel_state as ps

    from recipes.megatron.hf_checkpoint import load_pretrained
    from recipes.megatron import checkpointing, providers, runtime, train_step
    from recipes.metrics import MetricsLogger, model_flops_per_token, progress, throughput
    from recipes.rl.refit import refit, write_engine_dir
    from recipes.rl.rollout import start_engine
    from recipes.resume import (PREEMPTED, PreemptionFlag, check_fingerprint, drop_rows_after, preempted_exit,
                                restore_rng, rng_states, save_training_checkpoint)
    from recipes.trainer import build_model_and_optimizer, lora_of, model_tokenizer

    check_config(cfg)
    g = cfg.grpo

    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    torch.set_float32_matmul_precision(cfg.training.matmul_precision)
    runtime.init_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.training.seed, cp=cfg.parallel.cp)
    rank0 = runtime.rank() == 0
    run_dir, ckpt_dir = Path(cfg.output_dir), Path(cfg.output_dir) / "checkpoints"
    updates = g.steps * g.minibatches * g.epochs
    hf, chunks, optimizer, scheduler = build_model_and_optimizer(cfg, updates)
    tokenizer = model_tokenizer(cfg.model, int(hf["vocab_size"]))
    if cfg.model.init_checkpoint and lora_of(cfg) is None:  # a LoRA base is loaded when it is built
        load_pretrained(chunks, resolve_path(cfg.model.init_checkpoint))
    ref_chunks = None
    if cfg.loss.kl_coef > 0:  # a frozen copy of the starting policy
        ref_chunks = providers.build_model(hf, cfg.parallel.tp, cfg.parallel.pp, ddp=False,
                                           config_overrides=providers.memory_overrides(cfg.parallel.sequence_parallel))
        for ref, pol in zip(ref_chunks, providers.unwrap(chunks)):  # with LoRA: the base, i.e. the start
            ref.load_state_dict({k: v for k, v in pol.state_dict().items() if ".lora_" not in k})
    teacher_chunks = None
    if cfg.distill.teacher:
        from recipes.distillation import build_frozen_teacher
        from recipes.trainer import model_dtype

        teacher_chunks = build_frozen_teacher(cfg.distill.teacher, cfg.distill.teacher_hf_config, cfg.model,
                                              cfg.parallel, cfg.training.seed, model_dtype(cfg))
    teacher_endpoint = None
    if cfg.distill.teacher_url and rank0:  # rank 0 asks the endpoint; the other ranks receive its answers
        from recipes.distillation import connect_teacher_endpoint

        teacher_endpoint = connect_teacher_endpoint(cfg.distill, tokenizer)
    start = 0
    if cfg.checkpoint.resume and checkpointing.latest_step(ckpt_dir) is not None:
        start, extra = checkpointing.load_checkpoint(ckpt_dir, chunks, optimizer, scheduler)
        check_fingerprint(cfg, ckpt_dir, start)
        restore_rng(extra)
        runtime.print_rank0(f"[grpo] resumed from {ckpt_dir} at step {start}")
    if rank0:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / PREEMPTED).unlink(missing_ok=True)
        for name in ("metrics.jsonl", "rollouts.jsonl"):  # the steps after the checkpoint run again
            drop_rows_after(run_dir / name, start)
        engine_dir = write_engine_dir(hf, run_dir / "engine", tokenizer)
    backend = start_engine(cfg.rollout, engine_dir, max_model_len=int(hf.get("max_position_embeddings", 512)),
                           seed=cfg.training.seed, in_process=runtime.world_size() == 1) if rank0 else None
    refit(backend, chunks, hf, cfg.rollout.refit_bucket_mb)

    sampler = PromptSampler(cfg.prompts)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    logger = MetricsLogger(run_dir, tensorboard=cfg.logging.tensorboard, enabled=rank0)
    summary: dict = {"start_step": start, "stop_ids": sorted(backend.stop_ids) if rank0 else None}
    if rank0 and start == 0:
        summary["eval_before"] = heldout_accuracy(backend, tokenizer, cfg.eval, cfg.rollout.max_tokens)
        logger.log(0, summary["eval_before"], prefix="eval/")
    t_run = time.time()
    done = start
    temperature = cfg.rollout.temperature  # the trainer scores the distribution the rollouts were sampled from
    same_shape = ps.get_pipeline_model_parallel_world_size() > 1
    with progress(disable=not (rank0 and cfg.logging.progress)) as bar, PreemptionFlag() as preempt:
        bar_task = bar.add_task("grpo", total=g.steps, completed=start, info="")
        for step in range(start, g.steps):
            # 1. rollouts on rank 0, shared with every rank
            t0 = time.time()
            sampled = [sample_step(backend, tokenizer, sampler, cfg, step) if rank0 else None]
            if runtime.world_size() > 1:
                torch.distributed.broadcast_object_list(sampled, src=0)
            groups, sample_stats = sampled[0]
            t_gen = time.time() - t0
            if rank0 and cfg.rollout.colocated_sleep:  # free the GPU for training; refit wakes the engine
                backend.sleep()

            # 2. behaviour (and reference) log-probs, recomputed by the trainer
            t0 = time.time()
            batch = build_batch(groups, g.std_normalize, tokenizer.pad_id)
            n = batch["tokens"].shape[0]
            per_update = n // g.minibatches
            orders = [torch.randperm(n, generator=torch.Generator().manual_seed(step * 1000 + epoch)).tolist()
                      for epoch in range(g.epochs)]
            shares = [[order[k * per_update:(k + 1) * per_update][dp_rank::dp] for k in range(g.minibatches)]
                      for order in orders]
            loss_cfg, distill_metrics = cfg.loss, {}
            if teacher_chunks is not None and cfg.distill.mode == "topk":  # the teacher's top-k per position
                batch["topk_logp"], batch["topk_ids"] = full_topk(teacher_chunks, batch, g.micro_batch_size,
                                                                  cfg.distill.top_k, temperature)
                batch["adv"] = cfg.distill.reward_weight * batch["adv"]
            elif teacher_chunks is not None or cfg.distill.teacher_url:  # the teacher scores the sampled tokens
                teacher_logp = full_logprobs(teacher_chunks, batch, g.micro_batch_size, temperature, same_shape) \
                    if teacher_chunks is not None else endpoint_logprobs(teacher_endpoint, groups, batch)
                if cfg.distill.mode == "on_policy":  # advantages need the student's log-probs of every row first
                    batch["old_logp"] = full_logprobs(chunks, batch, g.micro_batch_size, temperature, same_shape)
                    distill_metrics = distill_gap(teacher_logp, batch)
                    batch["adv"] = on_policy_advantages(teacher_logp, batch["old_logp"], batch["loss_mask"],
                                                        batch["adv"], cfg.distill)
                else:  # kdrl: the loss's KL term, to the teacher, on the rows reward_guided leaves it
                    batch["ref_logp"] = teacher_logp
                    rewards = torch.tensor([r for gr in groups for r in gr.rewards])
                    batch["kl_rows"] = kl_rows(rewards, cfg.distill)
                    loss_cfg = dataclasses.replace(cfg.loss, kl_coef=kl_coef_at(cfg.distill, step, g.steps))
                    distill_metrics = {"distill/kl_coef": loss_cfg.kl_coef,
                                       "distill/kl_rows": float(batch["kl_rows"].float().mean())}
            # which rows each update trains: with pipeline parallelism all of them (micro-batches keep one shape);
            # with the top-k KL every row has a gradient whatever its advantage
            every_row = same_shape or "topk_ids" in batch
            updates = [[(rows, 0.0) if every_row else rows_to_train(batch, rows, loss_cfg) for rows in per_epoch]
                       for per_epoch in shares]
            # the first update scores its rows in its own forward pass (the weights have not moved yet); the
            # others need them from before the first update
            later = sorted({r for e, per_epoch in enumerate(updates) for k, (rows, _) in enumerate(per_epoch)
                            if (e, k) != (0, 0) for r in rows})
            if "old_logp" not in batch:
                batch["old_logp"] = full_logprobs(chunks, batch, g.micro_batch_size, temperature, same_shape, later)
            if ref_chunks is not None:
                batch["ref_logp"] = full_logprobs(ref_chunks, batch, g.micro_batch_size, temperature, same_shape)

            # 3. several clipped updates: minibatches x epochs, each split over DP ranks and micro-batches
            loss_stats: list = []
            loss_fn = make_loss_fn(loss_cfg, loss_stats, temperature, cfg.distill)
            reports = []
            for epoch in range(g.epochs):
                for k in range(g.minibatches):
                    mine, idle_denominator = updates[epoch][k]
                    micro = split_rows(batch, mine, g.micro_batch_size, same_shape)
                    micro[0]["idle_denominator"] = torch.tensor(idle_denominator)
                    if (epoch, k) == (0, 0) and not same_shape:
                        for m in micro:
                            m["on_policy"] = torch.tensor(True)
                    reports.append(train_step.optimizer_step(chunks, optimizer, micro,
                                                             max(m["tokens"].shape[1] for m in micro), scheduler,
                                                             loss_fn))
            t_train = time.time() - t0

            # 4. new weights into the rollout engine
            t_refit = refit(backend, chunks, hf, cfg.rollout.refit_bucket_mb)

            done = step + 1
            metrics = step_metrics(groups, batch, loss_stats, reports, sample_stats, tokenizer)
            metrics.update(distill_metrics)
            if rank0:
                log_rollouts(run_dir / "rollouts.jsonl", done, groups[:1], tokenizer)
            metrics.update(gen_seconds=t_gen, train_seconds=t_train, refit_seconds=t_refit,
                           step_seconds=t_gen + t_train + t_refit)
            # the training phase's throughput (rows at their padded length, every epoch; the log-prob passes
            # included in its time) and the rollouts' generated tokens per second
            rows_len = batch["tokens"].shape[1]
            metrics.update(throughput(batch["tokens"].numel() * g.epochs, t_train, runtime.world_size(),
                                      model_flops_per_token(hf, rows_len), runtime.device_peak_tflops()))
            metrics["gen_tokens_per_s"] = sum(len(r) for gr in groups for r in gr.responses) / max(t_gen, 1e-9)
            logger.log(done, metrics)
            bar.update(bar_task, completed=done, info=f"reward {metrics['reward/mean']:.3f} "
                                                     f"acc {metrics['accuracy']:.2f} "
                                                     f"{metrics['gen_tokens_per_s']:.0f} gen tok/s")
            if rank0 and cfg.eval.every_steps and done % cfg.eval.every_steps == 0 and done < g.steps:
                logger.log(done, heldout_accuracy(backend, tokenizer, cfg.eval, cfg.rollout.max_tokens), prefix="eval/")
            periodic = cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0
            signum = preempt.requested() if done < g.steps else 0  # the last step goes on to the final save
            if (periodic or signum) and done < g.steps:
                save_training_checkpoint(cfg, ckpt_dir, done, chunks, optimizer, scheduler,
                                         {**rng_states(), "prompt_step": done}, tokenizer.folder)
            if signum:
                if rank0:
                    logger.close()
                    backend.close()
                raise preempted_exit(run_dir, done, signum)
            if g.max_minutes and _out_of_time(t_run, g.max_minutes):
                runtime.print_rank0(f"[grpo] time budget of {g.max_minutes} min reached after step {done}")
                break
    summary.update(train_seconds=round(time.time() - t_run, 1), steps_done=done)
    if done > start or checkpointing.latest_step(ckpt_dir) != done:
        save_training_checkpoint(cfg, ckpt_dir, done, chunks, optimizer, scheduler,
                                 {**rng_states(), "prompt_step": done}, tokenizer.folder)
    if rank0:
        summary["eval_after"] = heldout_accuracy(backend, tokenizer, cfg.eval, cfg.rollout.max_tokens)
        logger.log(done, summary["eval_after"], prefix="eval/")
        logger.close()
        summary["reward_curve"] = str(plot_reward_curve(run_dir))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        runtime.print_rank0(f"[grpo] done: {done} steps in {summary['train_seconds']} s; held-out "
                            f"{summary.get('eval_before')} -> {summary['eval_after']}; run dir {run_dir}")
        backend.close()
        if teacher_endpoint is not None:
            teacher_endpoint.close()
    return summary


def log_rollouts(path: Path, step: int, groups: list[Group], tokenizer) -> None:
    """Each step's first group as text: the prompt the policy saw and what it wrote, with the rewards."""
    with open(path, "a", encoding="utf-8") as f:
        for gr in groups:
            f.write(json.dumps({"step": step, "problem_id": gr.problem["id"], "prompt": tokenizer.decode(gr.prompt),
                                "responses": [tokenizer.decode(r) for r in gr.responses], "rewards": gr.rewards},
                               ensure_ascii=False) + "\n")


def _out_of_time(t_start: float, minutes: float) -> bool:
    """Every rank must stop at the same step: rank 0 decides."""
    stop = torch.tensor([float(time.time() - t_start > minutes * 60)])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast(stop, src=0)
    return bool(stop.item())


def step_metrics(groups: list[Group], batch: dict, loss_stats: list, reports: list, sample_stats: dict,
                 tokenizer) -> dict:
    # clip fraction, KL and entropy are over the tokens that were trained (rows of all-equal groups are skipped)
    rewards = torch.tensor([r for gr in groups for r in gr.rewards])
    lengths = torch.tensor([float(len(r)) for gr in groups for r in gr.responses])
    truncated = torch.tensor([float(t) for gr in groups for t in gr.truncated])
    tokens = sum(s["tokens"] for s in loss_stats) or 1.0
    m = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
         "response_len/mean": float(lengths.mean()), "response_len/clipped_share": float(truncated.mean()),
         "clip_fraction": sum(s["clipped_tokens"] for s in loss_stats) / tokens,
         "kl": sum(s["kl_sum"] for s in loss_stats) / tokens,
         "entropy": sum(s["entropy_sum"] for s in loss_stats) / tokens,
         "loss": sum(r["loss"] for r in reports) / len(reports),
         "grad_norm": sum(r["grad_norm"] for r in reports) / len(reports), "lr": reports[-1]["lr"],
         "advantage/abs_mean": float(batch["adv"].abs().mean()), **sample_stats}
    if any("topk_kl_sum" in s for s in loss_stats):  # the trained tokens' top-k KL to the teacher
        m["distill/topk_kl"] = sum(s.get("topk_kl_sum", 0.0) for s in loss_stats) / tokens
    mismatch_tokens = sum(s.get("mismatch_tokens", 0.0) for s in loss_stats)
    if mismatch_tokens:  # the engine's vs the trainer's old-policy log-probs of the trained tokens (losses.py)
        m["mismatch/token_mult_prob_error"] = sum(s["mismatch_mult_prob_error_sum"]
                                                  for s in loss_stats) / mismatch_tokens
        m["mismatch/kl"] = sum(s["mismatch_kl_sum"] for s in loss_stats) / mismatch_tokens  # k1 of KL(engine||train)
        m["mismatch/kl_k3"] = sum(s["mismatch_kl_k3_sum"] for s in loss_stats) / mismatch_tokens
        m["mismatch/max_abs_logprob_diff"] = max(s.get("mismatch_max_abs_diff", 0.0) for s in loss_stats)
        if any("tis_weight_sum" in s for s in loss_stats):
            m["mismatch/tis_weight"] = sum(s.get("tis_weight_sum", 0.0) for s in loss_stats) / tokens
    for name in groups[0].parts:
        vals = torch.tensor([v for gr in groups for v in gr.parts[name]])
        m[f"reward/{name}/mean"], m[f"reward/{name}/std"] = float(vals.mean()), float(vals.std())
    if "accuracy" in groups[0].parts:
        m["accuracy"] = m["reward/accuracy/mean"]
    else:
        from recipes.grader import grade_response

        stops = set(tokenizer.stop_ids)
        texts = [(tokenizer.response_text(tokenizer.decode([t for t in r if t not in stops])), gr.problem["answer"])
                 for gr in groups for r in gr.responses]
        m["accuracy"] = sum(grade_response(text, answer).correct for text, answer in texts) / len(rewards)
    return m


# ------------------------------------------------------------------------------ entry points


def add_arguments(parser) -> None:
    from recipes.config import add_config_arguments

    # `nrr grpo rejection-sample [...]` is the same as `nrr grpo mode=rejection_sample [...]`
    add_config_arguments(parser, DEFAULT_CONFIG)


def cli(args) -> int:
    overrides = list(args.overrides)
    if overrides[:1] == ["rejection-sample"]:
        overrides = overrides[1:] + ["mode=rejection_sample"]
    return run_stage("recipes.grpo", GRPOConfig, args.config, overrides, check_config, run,
                     distributed=lambda cfg: cfg.mode == "train")  # rejection sampling runs in one process


def with_generation_budget(cfg: GRPOConfig) -> GRPOConfig:
    """The generation budget is set once (rollout.max_tokens): Dr.GRPO's normaliser and DAPO's overlong L_max
    follow it unless a config sets them."""
    loss = dataclasses.replace(cfg.loss, max_response_tokens=cfg.loss.max_response_tokens or cfg.rollout.max_tokens)
    rewards = dataclasses.replace(cfg.rewards,
                                  overlong_max_tokens=cfg.rewards.overlong_max_tokens or cfg.rollout.max_tokens)
    return dataclasses.replace(cfg, loss=loss, rewards=rewards)


def run(cfg: GRPOConfig) -> None:
    cfg = with_generation_budget(cfg)
    if cfg.mode == "rejection_sample":
        rejection_sample(cfg)
    else:
        train(cfg)


def rejection_sample(cfg: GRPOConfig) -> dict:
    """Sample the policy on train prompts (the embedded task's, or prompts.dataset's) and keep verified answers."""
    from recipes.megatron.providers import load_hf_config
    from recipes.rl import rejection_sampling
    from recipes.trainer import architecture, model_tokenizer

    hf = load_hf_config(architecture(cfg.model))
    tokenizer = model_tokenizer(cfg.model, int(hf["vocab_size"]))
    if cfg.prompts.dataset is None:
        problems = [{**p.to_dict(), "tests": None} for p in task.train_problems(
            cfg.prompts.levels, cfg.rejection.problems_per_level, seed=cfg.prompts.seed + 7)]
    else:
        problems = read_prompt_set(cfg.prompts)
    return rejection_sampling.run(cfg, hf, tokenizer, problems)


def _main() -> int:
    from recipes.megatron import runtime

    return runtime.torchrun_main("recipes.grpo", HELP, add_arguments, cli)


if __name__ == "__main__":
    sys.exit(_main())
