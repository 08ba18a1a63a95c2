"""The Megatron trainer every training stage shares: configs, model + optimizer, the loop, checkpoints, the entry.

SFT trains with it as is (`recipes.sft`); logit KD plugs in its loss and teacher through the loop's hooks
(`recipes.kd`); GRPO takes the model, optimizer, parallel, checkpoint and logging configs and builds its policy
with `build_model_and_optimizer` (`recipes.grpo`). Stages import this module, never each other.

Data flow of `train`: read the chat corpus -> tokenize with an assistant-only loss mask -> pack rows ->
AdamW (megatron-core optimizer, warmup + cosine) over global batches -> checkpoints (model, optimizer,
scheduler, data position, RNG) -> a Hugging Face export in `<output_dir>/hf`.

Preemption (SIGTERM / SIGUSR1 -> save the step, exit 75) and the config fingerprint a resume must match live in
`recipes.resume`, which GRPO uses too.

`run_stage` is the one entry point: load the typed config, check it, and run in this process when
tp*pp*dp == 1, else re-launch the stage's module under `torch.distributed.run` with tp*pp*dp processes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Literal

from recipes.config import ConfigError, load_config, resolve_path, save_config
from recipes.data.sft_dataset import DataConfig
from recipes.megatron.lora import PeftConfig
from recipes.resume import (PREEMPTED, REQUEUE_EXIT_CODE, Preempted, PreemptionFlag, check_fingerprint,
                            drop_rows_after, preempted_exit, restore_rng, rng_states, save_training_checkpoint)

TINY_STUDENT = "recipes/assets/models/tiny-qwen2/config.json"


# ------------------------------------------------------------------------------ config


@dataclasses.dataclass
class ModelConfig:
    # HF config.json of the architecture, used when init_checkpoint is unset (a checkpoint brings its own)
    hf_config: str | None = TINY_STUDENT
    init_checkpoint: str | None = None  # Megatron checkpoint or HF folder to start from (else random init)
    # a folder with the tokenizer files; None: init_checkpoint's tokenizer, else the one beside hf_config
    tokenizer: str | None = None


def architecture(model: ModelConfig) -> Path:
    """The HF config the model is built from: init_checkpoint's own (an HF folder's config.json, a Megatron
    checkpoint's hf_config.json) when it has one, else model.hf_config."""
    if model.init_checkpoint:
        init = resolve_path(model.init_checkpoint)
        for name in ("config.json", "hf_config.json"):
            if (init / name).is_file():
                return init / name
        if not init.exists():
            if not model.hf_config:
                raise ConfigError(f"model.init_checkpoint: {init} does not exist")
            # a checkpoint on the cluster's filesystem only: plan and validate with hf_config here; loading it
            # where it does not exist fails when the run starts
            return resolve_path(model.hf_config)
    if not model.hf_config:
        raise ConfigError("model.hf_config is required when model.init_checkpoint has no config.json / "
                          "hf_config.json")
    return resolve_path(model.hf_config)


def model_tokenizer(model: ModelConfig, vocab_size: int | None = None):
    """The model's own tokenizer and chat template (`recipes.tokenizer.ChatTokenizer`): model.tokenizer, else
    init_checkpoint's (an HF folder, or a Megatron checkpoint's tokenizer/), else the folder of hf_config. With
    the model's vocab_size, a tokenizer with ids past the embedding (the wrong tokenizer) is an error."""
    from recipes import tokenizer

    source = model.tokenizer or model.init_checkpoint or model.hf_config
    try:
        tok = tokenizer.load(resolve_path(source) if source else None)
        if vocab_size is not None:
            tok.check_model_vocab(vocab_size)
        return tok
    except ValueError as err:
        key = "model.tokenizer" if model.tokenizer else "model.init_checkpoint" if model.init_checkpoint \
            else "model.hf_config"
        raise ConfigError(f"{key}: {err}") from None


@dataclasses.dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 1  # data-parallel replicas; world size = tp * pp * cp * dp
    cp: int = 1  # context parallelism (splits the sequence; needs Transformer Engine)
    nodes: int = 1  # processes per node = world size / nodes
    # Adam states and fp32 main weights sharded over DP (megatron-core's DistributedOptimizer)
    distributed_optimizer: bool = False
    sequence_parallel: bool = False  # with tp > 1: norms, dropout and residuals hold S/TP tokens per rank
    # activation recompute: "selective" recomputes core attention, "full" every layer from its input
    recompute: Literal["none", "selective", "full"] = "none"


@dataclasses.dataclass
class OptimizerConfig:
    """Optimizer, schedule, seed and numerics: what `build_model_and_optimizer` reads (GRPO's `training:`)."""

    lr: float = 1.5e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1234
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    threads: int | None = 2  # torch CPU threads per process (None: torch's default)
    # float32 matmuls (torch.set_float32_matmul_precision): "high" allows TF32 on GPUs; "medium" allows bf16
    # products with float32 sums, which CPUs with AMX run ~2x faster (attention stays at "highest" on CPU)
    matmul_precision: Literal["highest", "high", "medium"] = "highest"


@dataclasses.dataclass
class TrainingConfig(OptimizerConfig):
    """SFT's and KD's `training:`: the optimizer's settings, and the global batch and its length."""

    # the global batch, in rows of data.seq_length tokens: set one of the three
    global_batch_size: int | None = 16
    global_batch_tokens: int | None = None  # rows = tokens / seq_length
    grad_accumulation: int | None = None  # rows = micro_batch_size * grad_accumulation * dp
    micro_batch_size: int = 16
    max_steps: int | None = 3000  # when both are set the smaller wins
    epochs: float | None = None


@dataclasses.dataclass
class ValidationConfig:
    every_steps: int = 500  # 0: never (a final validation still runs)
    max_rows: int = 64


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 750  # 0: only the final checkpoint
    keep_last: int = 2
    resume: bool = True  # continue from the latest checkpoint in output_dir/checkpoints
    # resume even though the config's computation-changing values differ from the checkpoint's (config_fingerprint)
    allow_config_change: bool = False


@dataclasses.dataclass
class LoggingConfig:
    every_steps: int = 10  # console line every N steps (metrics.jsonl gets every step)
    tensorboard: bool = True
    progress: bool = True


@dataclasses.dataclass
class SFTConfig:
    output_dir: str = "runs/sft"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)  # LoRA on a frozen base
    # write <output_dir>/hf at the end (for evaluation and vLLM); with LoRA merged, and the PEFT adapter in hf_lora
    export_hf: bool = True


def world_size(cfg) -> int:
    p = cfg.parallel
    return p.tp * p.pp * p.cp * p.dp


def resolve_batch(cfg: SFTConfig) -> tuple[int, int]:
    """(global batch rows, gradient-accumulation steps), checked against micro batch and DP."""
    t, dp, mbs = cfg.training, cfg.parallel.dp, cfg.training.micro_batch_size
    chosen = [k for k in ("global_batch_size", "global_batch_tokens", "grad_accumulation") if getattr(t, k)]
    if len(chosen) != 1:
        raise ConfigError(f"training: set exactly one of global_batch_size, global_batch_tokens, grad_accumulation "
                          f"(set: {chosen or 'none'}; null the others)")
    if t.global_batch_tokens:
        rows = t.global_batch_tokens // cfg.data.seq_length
        if rows * cfg.data.seq_length != t.global_batch_tokens:
            raise ConfigError(f"training.global_batch_tokens={t.global_batch_tokens} is not a multiple of "
                              f"data.seq_length={cfg.data.seq_length}")
    elif t.grad_accumulation:
        rows = mbs * t.grad_accumulation * dp
    else:
        rows = t.global_batch_size
    if rows % (mbs * dp):
        raise ConfigError(f"training: a global batch of {rows} rows is not divisible by micro_batch_size*dp "
                          f"= {mbs}*{dp}")
    return rows, rows // (mbs * dp)


def check_parallel(p: ParallelConfig) -> None:
    """The layout's own consistency (what the model's shape allows is checked when it is built)."""
    from recipes.megatron.providers import have_te

    if min(p.tp, p.pp, p.cp, p.dp, p.nodes) < 1:
        raise ConfigError("parallel: tp, pp, cp, dp and nodes must be >= 1")
    world = p.tp * p.pp * p.cp * p.dp
    if world % p.nodes:
        raise ConfigError(f"parallel: world size tp*pp*cp*dp={world} is not divisible by nodes={p.nodes}")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel needs tensor parallelism (parallel.tp > 1)")
    if p.cp > 1 and not have_te():
        raise ConfigError(f"parallel.cp={p.cp}: context parallelism needs Transformer Engine (transformer_engine "
                          "with CUDA), which this machine does not have; use cp: 1")


def lora_of(cfg):
    """The stage's LoRA config when it trains adapters, else None."""
    peft = getattr(cfg, "peft", None)
    return peft.lora if peft is not None and peft.lora.enabled else None


def check_config(cfg: SFTConfig) -> None:
    from recipes.megatron.lora import check_config as check_lora

    p = cfg.parallel
    check_parallel(p)
    check_lora(cfg.peft.lora)
    if cfg.training.max_steps is None and cfg.training.epochs is None:
        raise ConfigError("training: set max_steps or epochs")
    if cfg.data.think_ratio is not None and not 0.0 <= cfg.data.think_ratio <= 1.0:
        raise ConfigError(f"data.think_ratio must be in [0, 1], got {cfg.data.think_ratio}")
    resolve_batch(cfg)


# ------------------------------------------------------------------------------ data


@dataclasses.dataclass
class SFTData:
    train_rows: list
    valid_rows: list
    stats: dict


def prepare_data(cfg: SFTConfig, vocab_size: int, tokenizer, rank: int = 0) -> SFTData:
    """Read (or generate) the corpus, tokenize it and pack it into rows. Every rank builds the same rows."""
    from recipes.data import sft_dataset as sd
    from recipes.data.packing import useful_fraction
    from recipes.megatron.runtime import barrier as runtime_barrier

    train_path, valid_path = cfg.data.train_path, cfg.data.valid_path
    if train_path is None:
        corpus_dir = Path(cfg.output_dir) / "corpus"
        if rank == 0:
            train, valid = sd.write_task_corpus(cfg.data.task, corpus_dir)
        runtime_barrier()
        train_path = str(corpus_dir / "train.jsonl")
        if valid_path is None and cfg.data.task.valid_per_level > 0:
            valid_path = str(corpus_dir / "valid.jsonl")
    examples, stats = sd.load_examples(train_path, cfg.data, vocab_size, tokenizer, seed=cfg.training.seed)
    rows = sd.build_rows(examples, cfg.data.seq_length, cfg.data.packing, tokenizer.pad_id)
    valid_rows = []
    if valid_path is not None:
        valid_examples, _ = sd.load_examples(valid_path, cfg.data, vocab_size, tokenizer, seed=cfg.training.seed)
        valid_rows = sd.build_rows(valid_examples, cfg.data.seq_length, cfg.data.packing, tokenizer.pad_id)
    info = {**stats.to_dict(), "train_path": str(train_path), "valid_path": str(valid_path),
            "rows": len(rows), "useful_token_fraction": round(useful_fraction(rows), 4),
            "valid_rows": len(valid_rows)}
    return SFTData(rows, valid_rows, info)


# ------------------------------------------------------------------------------ model, optimizer, schedule


def total_steps(cfg: SFTConfig, n_rows: int) -> int:
    rows, _ = resolve_batch(cfg)
    steps = []
    if cfg.training.max_steps is not None:
        steps.append(cfg.training.max_steps)
    if cfg.training.epochs is not None:
        steps.append(max(1, math.ceil(cfg.training.epochs * n_rows / rows)))
    return min(steps)


def model_dtype(cfg):
    import torch

    return {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[cfg.training.precision]


def build_model_and_optimizer(cfg, steps: int):
    """The student's model chunks (DDP-wrapped), megatron's AdamW and its warmup + cosine schedule."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from recipes.megatron import providers, train_step

    hf = providers.load_hf_config(architecture(cfg.model))
    t = cfg.training
    p = cfg.parallel
    overrides = providers.memory_overrides(p.sequence_parallel, p.recompute, p.cp)
    if lora_of(cfg) is not None:  # the base (init_checkpoint, else the seed's random init) frozen, adapters trained
        from recipes.megatron.hf_checkpoint import build_adapted_model

        init = cfg.model.init_checkpoint
        base = {"init_checkpoint": str(resolve_path(init)) if init else None,
                "hf_config": str(architecture(cfg.model)), "seed": t.seed}
        chunks = build_adapted_model(hf, lora_of(cfg), base, p.tp, p.pp, dtype=model_dtype(cfg),
                                     config_overrides=overrides, distributed_optimizer=p.distributed_optimizer)
    else:
        chunks = providers.build_model(hf, p.tp, p.pp, seed=t.seed, dtype=model_dtype(cfg),
                                       distributed_optimizer=p.distributed_optimizer, config_overrides=overrides)
    optimizer = train_step.build_optimizer(chunks, lr=t.lr, weight_decay=t.weight_decay,
                                           betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, clip_grad=t.grad_clip,
                                           min_lr=t.min_lr, distributed=p.distributed_optimizer)
    warmup = min(t.warmup_steps, max(steps - 1, 0))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(steps, warmup + 1), lr_decay_style="cosine", start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=max(steps, 1), wd_incr_style="constant")
    return hf, chunks, optimizer, scheduler


# ------------------------------------------------------------------------------ the loop


def evaluate(chunks, rows: list, cfg: SFTConfig, loss_fn=None, prepare_batches=None, extra_metrics=None) -> dict:
    """Token-mean loss (and the loss's own metrics) over validation rows, forward only."""
    from megatron.core import parallel_state as ps

    from recipes.data.sft_dataset import micro_batches
    from recipes.megatron import train_step

    mbs, dp = cfg.training.micro_batch_size, ps.get_data_parallel_world_size()
    n = (min(len(rows), cfg.validation.max_rows) // (mbs * dp)) * (mbs * dp)
    if n == 0:
        return {}
    import torch

    batches = micro_batches(rows[:n], mbs, ps.get_data_parallel_rank(), dp)
    if prepare_batches is not None:
        batches = prepare_batches(batches)
    for c in chunks:
        c.eval()
    with torch.no_grad():
        report = train_step.forward_backward(chunks, batches, cfg.data.seq_length, forward_only=True,
                                             loss_fn=loss_fn)
    for c in chunks:
        c.train()
    return {"loss": report["loss"], **(extra_metrics() if extra_metrics is not None else {})}


def train(cfg: SFTConfig, loss_fn=None, prepare_batches=None, extra_metrics=None, on_init=None,
          stage: str = "sft") -> dict:
    """Run the recipe in this process (one rank of tp*pp*dp). Returns a summary dict.

    Hooks used by other recipes (logit KD): `on_init()` runs once the process groups exist and before
    the student is built (e.g. builds a teacher); `loss_fn(logits, batch) -> (loss_sum, n_tokens)`
    replaces the cross-entropy; `prepare_batches(micro_batches)` runs before each step (e.g. attaches
    teacher logits); `extra_metrics()` returns and resets per-step metrics to log.
    """
    import torch
    from megatron.core import parallel_state as ps

    from recipes.data.sft_dataset import RowSampler, micro_batches
    from recipes.megatron import checkpointing, runtime, train_step
    from recipes.metrics import MetricsLogger, model_flops_per_token, progress, throughput

    check_config(cfg)
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    torch.set_float32_matmul_precision(cfg.training.matmul_precision)
    runtime.init_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.training.seed, cp=cfg.parallel.cp)
    if runtime.world_size() != world_size(cfg):
        raise ConfigError(f"parallel: tp*pp*cp*dp = {world_size(cfg)} but {runtime.world_size()} processes run")
    if on_init is not None:
        on_init()
    rank0 = runtime.rank() == 0
    from recipes.megatron.providers import have_te

    if have_te() and cfg.data.packing and cfg.training.micro_batch_size > 1:
        raise ConfigError("with Transformer Engine packed rows run as THD, one row per micro batch: set "
                          "training.micro_batch_size=1 (or data.packing=false)")
    run_dir = Path(cfg.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    from recipes.megatron.providers import load_hf_config

    vocab = int(load_hf_config(architecture(cfg.model))["vocab_size"])
    tokenizer = model_tokenizer(cfg.model, vocab)
    data = prepare_data(cfg, vocab, tokenizer, rank=runtime.rank())
    rows_per_step, grad_acc = resolve_batch(cfg)
    steps = total_steps(cfg, len(data.train_rows))
    sampler = RowSampler(data.train_rows, rows_per_step, seed=cfg.training.seed)
    _, chunks, optimizer, scheduler = build_model_and_optimizer(cfg, steps)

    # resume from our own checkpoints, else start from an init checkpoint, else from the random init
    start = 0
    if cfg.checkpoint.resume and checkpointing.latest_step(ckpt_dir) is not None:
        start, extra = checkpointing.load_checkpoint(ckpt_dir, chunks, optimizer, scheduler)
        if extra.get("consumed_rows") != start * rows_per_step:
            raise ConfigError(f"{ckpt_dir}: step {start} consumed {extra.get('consumed_rows')} rows but this config "
                              f"gives {start * rows_per_step}: resume with the same batch settings, or set "
                              "checkpoint.resume=false / a new output_dir")
        check_fingerprint(cfg, ckpt_dir, start)
        restore_rng(extra)
        runtime.print_rank0(f"[{stage}] resumed from {ckpt_dir} at step {start}")
    elif cfg.model.init_checkpoint and lora_of(cfg) is None:  # a LoRA base is loaded when it is built
        from recipes.megatron.hf_checkpoint import load_pretrained

        load_pretrained(chunks, resolve_path(cfg.model.init_checkpoint))

    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mbs = cfg.training.micro_batch_size
    last_pp_first_tp = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0
    if last_pp_first_tp:  # the steps after the checkpoint run again: their rows are written again
        drop_rows_after(run_dir / "metrics.jsonl", start)
    if rank0:
        (run_dir / PREEMPTED).unlink(missing_ok=True)
    logger = MetricsLogger(run_dir, tensorboard=cfg.logging.tensorboard, enabled=last_pp_first_tp)
    if rank0:
        runtime.print_rank0(f"[{stage}] {data.stats['examples']} examples -> {len(data.train_rows)} rows of "
                            f"{cfg.data.seq_length} (useful tokens {data.stats['useful_token_fraction']:.1%}); "
                            f"{steps} steps of {rows_per_step} rows (micro batch {mbs}, grad accumulation "
                            f"{grad_acc}, dp {dp})")
    summary: dict = {"data": data.stats, "steps": steps, "start_step": start}
    flops_per_token = model_flops_per_token(load_hf_config(architecture(cfg.model)), cfg.data.seq_length)
    peak = runtime.device_peak_tflops()
    hooks = (loss_fn, prepare_batches, extra_metrics)
    report = {"loss": float("nan")}
    t_start = time.time()
    with progress(disable=not (rank0 and cfg.logging.progress)) as bar, PreemptionFlag() as preempt:
        task = bar.add_task(stage, total=steps, completed=start, info="")
        for step in range(start, steps):
            t0 = time.time()
            batches = micro_batches(sampler.global_batch(step), mbs, dp_rank, dp)
            if prepare_batches is not None:
                batches = prepare_batches(batches)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler then moves on)
            report = train_step.optimizer_step(chunks, optimizer, batches, cfg.data.seq_length, scheduler, loss_fn)
            dt = time.time() - t0
            done = step + 1
            metrics = {"loss": report["loss"], "lr": lr, "grad_norm": report["grad_norm"],
                       "tokens_per_s": rows_per_step * cfg.data.seq_length / dt,
                       **throughput(rows_per_step * cfg.data.seq_length, dt, runtime.world_size(), flops_per_token,
                                    peak),
                       "loss_tokens": report["num_tokens"], "step_time_s": dt,
                       "epoch": done / sampler.steps_per_epoch}
            if extra_metrics is not None:
                metrics.update(extra_metrics())
            logger.log(done, metrics)
            bar.update(task, completed=done, info=f"loss {report['loss']:.4f} lr {lr:.2e} "
                                                  f"{metrics['tokens_per_s']:.0f} tok/s")
            if cfg.logging.every_steps and done % cfg.logging.every_steps == 0 and not cfg.logging.progress:
                runtime.print_rank0(f"[{stage}] step {done}/{steps} loss {report['loss']:.4f} "
                                    f"lr {lr:.2e} grad_norm {report['grad_norm']:.3f} "
                                    f"{metrics['tokens_per_s_per_gpu']:.0f} tok/s/GPU "
                                    f"{metrics['model_tflops_per_gpu']:.2f} TFLOP/s/GPU"
                                    + (f" MFU {metrics['mfu']:.1%}" if "mfu" in metrics else ""))
            if cfg.validation.every_steps and done % cfg.validation.every_steps == 0 and done < steps \
                    and data.valid_rows:
                logger.log(done, evaluate(chunks, data.valid_rows, cfg, *hooks), prefix="valid/")
            periodic = cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0
            signum = preempt.requested() if done < steps else 0  # the last step goes on to the final save
            if (periodic or signum) and done < steps:
                save_training_checkpoint(cfg, ckpt_dir, done, chunks, optimizer, scheduler,
                                         {**rng_states(), "consumed_rows": done * rows_per_step},
                                         tokenizer.folder)
            if signum:
                logger.close()
                raise preempted_exit(run_dir, done, signum)
    elapsed = time.time() - t_start
    if start < steps or checkpointing.latest_step(ckpt_dir) != steps:
        save_training_checkpoint(cfg, ckpt_dir, steps, chunks, optimizer, scheduler,
                                 {**rng_states(), "consumed_rows": steps * rows_per_step},
                                 tokenizer.folder)
    summary.update(final_loss=report["loss"], train_seconds=round(elapsed, 2))
    if data.valid_rows:
        valid = evaluate(chunks, data.valid_rows, cfg, *hooks)
        summary["valid_loss"] = valid.get("loss")
        logger.log(steps, valid, prefix="valid/")
    logger.close()
    runtime.barrier()
    if cfg.export_hf:
        from recipes.megatron.hf_checkpoint import export_lora_adapter, export_to_hf

        # collective: every rank takes part
        summary["hf_dir"] = str(export_to_hf(ckpt_dir, run_dir / "hf", merge_lora=lora_of(cfg) is not None))
        if lora_of(cfg) is not None and cfg.parallel.pp == 1:
            summary["hf_lora_dir"] = str(export_lora_adapter(ckpt_dir, run_dir / "hf_lora"))
    if rank0:
        import json

        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    runtime.print_rank0(f"[{stage}] done: {steps} steps, final loss {report['loss']:.4f}, "
                        f"{elapsed:.0f} s; run dir {run_dir}")
    return summary


# ------------------------------------------------------------------------------ entry


def launch(module: str, cfg_world: int, nodes: int, config: str | None, overrides: list[str],
           run_dir: str | None = None) -> int:
    """Re-launch `python -m module` under torch.distributed.run with one process per rank of this node.

    SIGTERM / SIGUSR1 (and SIGINT, SIGHUP) sent to this process are passed to torchrun, which passes them to the
    ranks (SIGTERM / SIGUSR1: they save a checkpoint, `PreemptionFlag`) and waits for them. torchrun's own exit
    code is 1 whatever the ranks returned: a run stopped that way is recognised by the marker rank 0 wrote into
    `run_dir`."""
    import subprocess

    if nodes > 1:
        raise ConfigError(f"parallel.nodes={nodes}: start one `python -m torch.distributed.run --nnodes {nodes} "
                          f"... -m {module}` per node (nrr launch / Slurm does this)")
    # torchrun forwards SIGUSR1 too (by default it dies of it, leaving the ranks behind), and grants the ranks
    # TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds after a signal before it kills them (torch's default, 30, is shorter
    # than a large checkpoint's save)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg_world}",
           "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "-m", module]
    cmd += (["--config", config] if config else []) + list(overrides)
    # the ranks share this node's cores: their idle OpenMP threads sleep rather than spin for each other
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")}
    started = time.time()
    # torchrun in a session of its own, this process passing on each signal once: a second SIGTERM reaching
    # torchrun while it waits for the ranks to save would make it give up on them
    child = subprocess.Popen(cmd, env=env, start_new_session=True)
    previous = {sig: signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
                for sig in (signal.SIGINT, signal.SIGHUP, *PreemptionFlag.SIGNALS)}
    try:
        rc = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    marker = Path(run_dir) / PREEMPTED if run_dir else None
    if rc != 0 and marker is not None and marker.is_file() and marker.stat().st_mtime >= started:
        return REQUEUE_EXIT_CODE
    return rc


def run_stage(module: str, cfg_cls: type, config: str | None, overrides: list[str], check: Callable,
              run: Callable, distributed: Callable = lambda cfg: True) -> int:
    """A training stage's command line: load and check its config, then run it here (one rank) or re-launch
    `python -m module` with one process per rank. `distributed(cfg)` False runs in this process whatever the
    layout (GRPO's rejection sampling). A run stopped by SIGTERM / SIGUSR1 returns REQUEUE_EXIT_CODE."""
    from recipes.megatron import runtime

    runtime.quiet_cpu_warnings()
    cfg = load_config(cfg_cls, resolve_path(config) if config else None, overrides)
    check(cfg)
    if distributed(cfg) and world_size(cfg) > 1 and "RANK" not in os.environ:
        return launch(module, world_size(cfg), cfg.parallel.nodes, config, overrides, cfg.output_dir)
    try:
        run(cfg)
    except Preempted:
        return REQUEUE_EXIT_CODE
    return 0
