"""The one table of `nrr` stages: the CLI lists and dispatches them from it, each stage module takes its help line
and default config from it, and the launchers take how to start a stage and which config key names its output
folder. Plain data, no imports: reading it costs nothing (`nrr --help` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LauncherKind = Literal["torchrun", "ray", "python"]


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # imported only when the stage runs; it defines add_arguments(parser) and cli(args)
    help: str
    default_config: str | None = None
    # how `nrr launch` starts it (None: not launchable): torchrun for Megatron stages (one process per GPU), ray
    # for Curator (its own Ray cluster), python for one process
    launcher: LauncherKind | None = None
    output_key: str | None = None  # "output_dir", the one key that names a run's output folder (None: it has none)


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("task", "recipes.task_cli", "Show or export problems of the embedded arithmetic reasoning task.",
          launcher="python"),
    Stage("data", "recipes.data_cli", "List the shipped datasets (benchmarks, GSM8K train) or prepare them from a "
          "local copy or the hub."),
    Stage("sft", "recipes.sft", "Supervised fine-tuning (reasoning-trace distillation) of a student with "
          "megatron-core.", "nemo_configs/sft/tiny_cpu.yaml", "torchrun", "output_dir"),
    Stage("kd", "recipes.kd", "Logit knowledge distillation (forward/reverse KL, top-k, temperature) from a teacher "
          "checkpoint.", "nemo_configs/kd/tiny_cpu.yaml", "torchrun", "output_dir"),
    Stage("curate", "recipes.curate", "Curate a long chain-of-thought corpus with a NeMo Curator pipeline (teacher, "
          "filters, dedup, decontam).", "nemo_configs/curate/embedded.yaml", "ray", "output_dir"),
    Stage("teacher", "recipes.teacher.cli", "Serve the embedded teacher (OpenAI-compatible) with configurable defects "
          "and faults.", "nemo_configs/teacher/embedded.yaml"),
    Stage("grpo", "recipes.grpo", "GRPO / Dr.GRPO / DAPO with vLLM rollouts on the Megatron policy (or `grpo "
          "rejection-sample`).", "nemo_configs/grpo/tiny_cpu.yaml", "torchrun", "output_dir"),
    Stage("distill", "recipes.distill_cli", "On-policy distillation (sampled-token or top-k KL to a teacher) or KDRL: "
          "the GRPO loop with a frozen teacher.", "nemo_configs/grpo/opd_tiny_cpu.yaml", "torchrun", "output_dir"),
    Stage("convert", "recipes.convert", "Convert checkpoints: HF -> Megatron (from-hf), Megatron -> HF (to-hf), "
          "random-init base (init).", launcher="python"),
    Stage("eval", "recipes.eval", "Evaluate reasoning on MATH-500, AIME24, AMC23, GSM8K, Minerva, OlympiadBench and "
          "the embedded task; grade files; compare runs.", "nemo_configs/eval/embedded.yaml", "python", "output_dir"),
    Stage("bench", "recipes.bench", "Benchmarks: sft (packing efficiency), curate (filter speed, grader fast path), "
          "eval, grpo (rollout speed), reported as ratios measured in one run."),
    Stage("plan", "recipes.plan_cli", "Per-GPU memory plan of a training layout (named recipes, a config, or any HF "
          "model) and the layouts that fit."),
    Stage("launch", "launchers.launch_cli", "Run a stage or the whole pipeline through NeMo-Run (local, Slurm, "
          "Kubernetes)."),
    Stage("pipeline", "launchers.pipeline_cli", "Run the whole pipeline (curate, SFT, GRPO, eval, export) as one "
          "NeMo-Run experiment.", "nemo_configs/pipeline/embedded.yaml"),
    Stage("regress", "launchers.regress_cli", "Run the regression suite against golden metrics and write a pass/fail "
          "table."),
]}
