"""Teacher -> student distillation pieces that logit KD (`recipes.kd`, fixed data) and on-policy distillation
(`recipes.grpo` with a `distill` section, the student's own samples) share: the frozen teacher model, and the
per-token signals.

On-policy distillation: the student samples responses; the teacher scores the student's sampled tokens; each
token's advantage is the sampled-token estimate of the negative reverse KL,

    A_t = log pi_teacher(y_t | y_<t) - log pi_student(y_t | y_<t)          (y ~ pi_student)

so that the clipped policy gradient minimises KL(pi_student || pi_teacher) on the student's own distribution,
without full-vocabulary logits (`distill.mode: on_policy`; `distill.reward_weight` adds the group-relative reward
advantage). KDRL (`distill.mode: kdrl`) keeps GRPO's reward advantage and adds beta_t * k3(student, teacher) to
every response token's loss, beta_t moving linearly from `kl_coef` to `kl_coef_end` over the run; with
`reward_guided`, responses that earned a reward carry no KL term (RL alone keeps what already works).

The teacher is a checkpoint (`distill.teacher`: frozen chunks in the student's layout) or an OpenAI-compatible
endpoint (`distill.teacher_url`, e.g. `vllm serve <teacher>`) for on_policy and kdrl: rank 0 asks it for the
log-probs of every row's tokens (vLLM's prompt log-probs) and hands them to the other ranks; before training the
endpoint's tokenizer is checked against the student's on a probe text.

Top-k distillation (`distill.mode: topk`): the student samples as above; a teacher pass gives, per position, its
`top_k` most likely token ids and their log-probs; each response token's loss is coef * KL between student and
teacher restricted to those ids and renormalised there (`kind`: forward, reverse, or alpha * forward +
(1 - alpha) * reverse), a dense per-token signal instead of one sampled token's; `reward_weight` adds the clipped
policy gradient on the group reward advantage. Under tensor parallelism neither side gathers a vocabulary row:
the teacher's top-k is the top-k of each vocab shard's top-k, and the student's logits at those ids are picked on
the shard that holds them and summed over ranks.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from recipes.config import ConfigError, resolve_path


@dataclasses.dataclass
class DistillConfig:
    teacher: str | None = None  # the teacher's Megatron checkpoint or HF folder; None: no teacher (plain GRPO)
    teacher_hf_config: str | None = None  # the teacher's architecture (config.json); None: the student's
    # or the teacher behind an OpenAI-compatible endpoint that returns prompt log-probs (vLLM: http://host:8000/v1)
    teacher_url: str | None = None
    teacher_model: str | None = None  # the model name the endpoint serves
    teacher_api_key_env: str | None = None  # the env var holding the endpoint's key; None: it needs none
    mode: Literal["on_policy", "kdrl", "topk"] = "on_policy"
    coef: float = 1.0  # on_policy: weight of the per-token teacher advantage; topk: of the top-k KL
    reward_weight: float = 0.0  # on_policy, topk: weight of the group-relative reward advantage beside it
    top_k: int = 64  # topk: the teacher's most likely tokens the KL is restricted to
    kind: Literal["forward", "reverse", "mixed"] = "forward"  # topk: KL(teacher || student), the reverse, a mix
    alpha: float = 0.5  # topk, kind=mixed: weight of the forward KL
    kl_coef: float = 0.1  # kdrl: beta at the first step, in [0, 1]
    kl_coef_end: float | None = None  # kdrl: beta at the last step (linear in between); None: constant
    reward_guided: bool = True  # kdrl: no KL term on responses whose reward is > 0


def check_distill(cfg: DistillConfig, rollout_temperature: float = 1.0) -> None:
    if cfg.teacher and cfg.teacher_url:
        raise ConfigError("distill.teacher and distill.teacher_url are both set: give the teacher one way, as a "
                          "checkpoint (teacher) or behind an endpoint (teacher_url)")
    if not (cfg.teacher or cfg.teacher_url):
        return
    if cfg.teacher_url:
        check_teacher_endpoint(cfg, rollout_temperature)
    for key in ("kl_coef", "kl_coef_end"):
        value = getattr(cfg, key)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"distill.{key}={value}: the KL weight schedule must stay in [0, 1]")
    if cfg.mode in ("on_policy", "topk") and cfg.coef <= 0:
        raise ConfigError(f"distill.coef={cfg.coef}: on-policy distillation needs a positive teacher weight")
    if cfg.top_k < 1:
        raise ConfigError(f"distill.top_k={cfg.top_k}: the KL needs at least one of the teacher's tokens (>= 1)")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ConfigError(f"distill.alpha={cfg.alpha}: the forward KL's weight in the mix must be in [0, 1]")
    if cfg.reward_weight < 0:
        raise ConfigError(f"distill.reward_weight={cfg.reward_weight} must be >= 0")


def kl_coef_at(cfg: DistillConfig, step: int, steps: int) -> float:
    """KDRL's beta for `step` (0-based) of `steps`: linear from kl_coef to kl_coef_end."""
    end = cfg.kl_coef if cfg.kl_coef_end is None else cfg.kl_coef_end
    frac = step / (steps - 1) if steps > 1 else 0.0
    return cfg.kl_coef + (end - cfg.kl_coef) * frac


def on_policy_advantages(teacher_logp: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor,
                         reward_adv: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """[B, S] per-token advantages: coef * (teacher - student) log-probs of the sampled tokens (0 outside the
    responses) + reward_weight * the row's group-relative reward advantage."""
    inside = mask > 0
    gap = torch.where(inside, teacher_logp - student_logp, torch.zeros_like(student_logp))
    return cfg.coef * gap + cfg.reward_weight * reward_adv[:, None] * inside


def kl_rows(rewards: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """[B] bool: the responses KDRL's KL term applies to (with reward_guided, those that earned no reward)."""
    return rewards <= 0 if cfg.reward_guided else torch.ones_like(rewards, dtype=torch.bool)


def _tp() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1, 0
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


@torch.no_grad()
def vocab_parallel_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, token ids) [.., k] of the k most likely tokens of softmax(logits), from vocab-parallel logits
    [.., V/TP]. Exact: the global top-k is among the union of every shard's top-k."""
    tp, rank = _tp()
    if tp == 1:
        return torch.log_softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
    from megatron.core import parallel_state as ps

    from recipes.megatron import train_step

    logp = train_step.vocab_parallel_log_softmax(logits)
    shard = logp.shape[-1]
    values, ids = logp.topk(min(k, shard), dim=-1)
    group = ps.get_tensor_model_parallel_group()
    all_values, all_ids = [torch.empty_like(values) for _ in range(tp)], [torch.empty_like(ids) for _ in range(tp)]
    torch.distributed.all_gather(all_values, values.contiguous(), group=group)
    torch.distributed.all_gather(all_ids, (ids + rank * shard).contiguous(), group=group)  # global ids
    values, pick = torch.cat(all_values, dim=-1).topk(min(k, tp * shard), dim=-1)
    return values, torch.cat(all_ids, dim=-1).gather(-1, pick)


def vocab_parallel_select(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits[.., ids] [.., k] from vocab-parallel logits [.., V/TP] without gathering the vocabulary: each rank
    takes the ids of its shard (0 for the others) and the ranks' picks are summed (all-reduce forward, identity
    backward: each rank's gradient lands on its own shard's entries)."""
    from recipes.megatron import train_step

    tp, rank = _tp()
    if tp == 1:
        return logits.gather(-1, ids)
    shard = logits.shape[-1]
    local = ids - rank * shard
    mine = (local >= 0) & (local < shard)
    picked = logits.gather(-1, local.clamp(0, shard - 1))
    return train_step.tp_sum(torch.where(mine, picked, torch.zeros_like(picked)))


def topk_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """Per-position KL [..] between student and teacher on the teacher's top-k support, both renormalised there:
    `student_logits` and `teacher_logp` [.., k] are at the same token ids."""
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    log_p = torch.log_softmax(teacher_logp.detach().float(), dim=-1)
    forward = (log_p.exp() * (log_p - log_q)).sum(-1)
    reverse = (log_q.exp() * (log_q - log_p)).sum(-1)
    if cfg.kind == "forward":
        return forward
    if cfg.kind == "reverse":
        return reverse
    return cfg.alpha * forward + (1.0 - cfg.alpha) * reverse


@torch.no_grad()
def teacher_topk(chunks: list, tokens: torch.Tensor, k: int,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k (log-probs, token ids) [B, S-1, k] for the next token after each of `tokens`' first
    S-1 positions (aligned like `train_step.logprobs_of`), on every TP rank; without pipeline parallelism."""
    from recipes.megatron import train_step

    b, s = tokens.shape
    train_step.check_sequence_split(chunks, [s], s)
    batch = train_step.to_device({"tokens": tokens, "position_ids": torch.arange(s).expand(b, s)})
    logits = chunks[0](batch["tokens"], batch["position_ids"], None)
    logp, ids = vocab_parallel_topk(logits.float()[:, :-1] / temperature, k)
    return logp.float().cpu(), ids.cpu()


def build_frozen_teacher(teacher_checkpoint: str, teacher_hf_config: str | None, student, parallel, seed: int,
                         dtype) -> list:
    """The teacher as frozen megatron chunks in the student's TP/PP layout. A teacher whose tokenizer or padded
    vocabulary differs from the student's is an error: both score the same token ids."""
    from recipes.megatron import providers
    from recipes.megatron.hf_checkpoint import load_pretrained
    from recipes.trainer import ModelConfig, architecture, model_tokenizer

    teacher = ModelConfig(hf_config=teacher_hf_config or student.hf_config, init_checkpoint=teacher_checkpoint)
    t_hf = providers.load_hf_config(architecture(teacher))
    s_hf = providers.load_hf_config(architecture(student))
    if providers.padded_vocab_size(t_hf, parallel.tp) != providers.padded_vocab_size(s_hf, parallel.tp):
        raise ConfigError(f"teacher: vocab_size {t_hf['vocab_size']} differs from the student's {s_hf['vocab_size']}: "
                          "distillation needs one tokenizer and vocabulary")
    t_tok, s_tok = model_tokenizer(teacher), model_tokenizer(student)
    if t_tok.hf.get_vocab() != s_tok.hf.get_vocab():
        raise ConfigError(f"teacher {teacher_checkpoint}: its tokenizer ({t_tok.folder}) is not the student's "
                          f"({s_tok.folder}): teacher and student must score the same token ids")
    chunks = providers.build_model(t_hf, parallel.tp, parallel.pp, seed=seed, ddp=False, dtype=dtype,
                                   config_overrides=providers.memory_overrides(parallel.sequence_parallel))
    load_pretrained(chunks, resolve_path(teacher_checkpoint))
    for c in chunks:
        c.eval()
        c.requires_grad_(False)
    return chunks


# ------------------------------------------------------------------------------ a teacher behind an endpoint

# chat markup, digits, operators, think tags, LaTeX and non-ASCII text: where two tokenizers usually part ways
PROBE_QUESTION = "Compute (37 + 4) * 5 - 2. Put the final answer in \\boxed{}. Größe, 數學, ½ ≤ π"
PROBE_RESPONSE = "<think>\n37 + 4 = 41, 41 * 5 = 205, 205 - 2 = 203\n</think>\n\\boxed{203}"


def check_teacher_endpoint(cfg: DistillConfig, rollout_temperature: float) -> None:
    if not cfg.teacher_model:
        raise ConfigError(f"distill.teacher_url={cfg.teacher_url} needs distill.teacher_model: the model name the "
                          "endpoint serves (vLLM: --served-model-name, else the path it was started with)")
    if cfg.teacher_hf_config:
        raise ConfigError("distill.teacher_hf_config describes a checkpoint teacher (distill.teacher); an endpoint "
                          "teacher (distill.teacher_url) has its architecture on its server: remove it")
    if cfg.mode not in ("on_policy", "kdrl"):
        raise ConfigError(f"distill.mode={cfg.mode} with distill.teacher_url: an endpoint returns the log-probs of "
                          "the tokens that are there, not the teacher's full distribution per position; use "
                          "on_policy or kdrl, or give the teacher as a checkpoint (distill.teacher)")
    if rollout_temperature != 1.0:
        raise ConfigError(f"distill.teacher_url with rollout.temperature={rollout_temperature}: the endpoint scores "
                          "the teacher at temperature 1 (prompt log-probs come from its raw logits) while the "
                          "student is scored at the rollout temperature, so the two would be compared at different "
                          "temperatures; set rollout.temperature=1.0, or give the teacher as a checkpoint "
                          "(distill.teacher), which is scored at the student's temperature")


def connect_teacher_endpoint(cfg: DistillConfig, student_tokenizer):
    """The endpoint teacher's client (`OpenAIBackend`), once its tokenizer is the student's and it returns prompt
    log-probs; the key comes from `teacher_api_key_env` and goes to the client only."""
    from recipes.generation.openai_endpoint import EndpointCapabilityError, OpenAIBackend

    endpoint = OpenAIBackend(cfg.teacher_url, cfg.teacher_model, api_key_env=cfg.teacher_api_key_env,
                             key_setting="distill.teacher_api_key_env")
    try:
        ids = check_endpoint_tokenizer(endpoint, student_tokenizer)
        endpoint.prompt_logprobs([ids])  # fails now, not after the first rollouts, if it returns none
    except EndpointCapabilityError as err:
        endpoint.close()
        raise ConfigError(f"distill.teacher_url={cfg.teacher_url}: {err}") from None
    except ConfigError:
        endpoint.close()
        raise
    return endpoint


def check_endpoint_tokenizer(endpoint, student_tokenizer) -> list[int]:
    """The probe (a chat prompt in the student's template and a response) tokenized by the endpoint's server and
    by the student's tokenizer; different ids are a ConfigError naming both. Returns the ids."""
    probe = student_tokenizer.render([{"role": "user", "content": PROBE_QUESTION}],
                                     add_generation_prompt=True) + PROBE_RESPONSE
    theirs, ours = endpoint.tokenize(probe), student_tokenizer.encode(probe)
    if theirs != ours:
        at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        raise ConfigError(
            f"distill.teacher_url={endpoint.base_url}: the endpoint's tokenizer (model {endpoint.model}) is not the "
            f"student's ({student_tokenizer.folder}): they split the probe text {probe!r} differently (from token "
            f"{at}: endpoint {theirs[at:at + 6]}, student {ours[at:at + 6]}); teacher and student must score the "
            "same token ids")
    return ours


def endpoint_teacher_logprobs(endpoint, sequences: list[list[int]], width: int) -> torch.Tensor:
    """[B, width] the endpoint teacher's log-prob of each row's tokens (prompt + response), aligned with `labels`
    as the trainer's are: column j holds log p(token j+1 | tokens 0..j); 0 past the row's end."""
    out = torch.zeros(len(sequences), width)
    for i, lps in enumerate(endpoint.prompt_logprobs(sequences)):
        out[i, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
    return out
