"""Named recipes: functions that return a complete, overridable SFT, KD or GRPO config for a real model on H100
nodes, starting from the model's Hugging Face checkpoint, at a layout the memory planner chose and checked.

    from recipes.named_recipes import qwen25_7b_sft, RECIPES
    cfg = qwen25_7b_sft(nodes=2, train_path="/data/traces.parquet", hf_checkpoint="/models/Qwen2.5-7B-Instruct")
    print(describe(cfg))            # the layout and its per-GPU memory plan
    RECIPES["qwen2.5-32b-kd"](nodes=4)

Each function takes `nodes` (and `gpus_per_node`), the sequence length, the batch and the data; the layout
(TP/PP/CP/DP, sequence parallelism, recompute, micro batch, distributed optimizer) is the planner's best one for
that model, length and node count (`recipes.planner.search`), unless `layout=` names one, which is then checked.
A layout that does not fit 80 GiB, or a node count nothing fits, is an error before anything is written.
`python -m recipes.named_recipes` prints every recipe's plan; `--write` regenerates the YAML files under
`nemo_configs/{sft,kd,grpo}/` from these functions.

Long-CoT stages (SFT, KD) default to 16,384-token rows; GRPO to 1,024 prompt + 8,192 response tokens. The
architectures are the published ones (`recipes/assets/models/<name>/config.json`, the `config.json` of the
model's Hugging Face repository); `model.init_checkpoint` is the HF folder the run loads (on the cluster's
filesystem; override it there).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from recipes import planner
from recipes.config import resolve_path
from recipes.data.sft_dataset import DataConfig
from recipes.trainer import (CheckpointConfig, LoggingConfig, ModelConfig, ParallelConfig, SFTConfig,
                             TrainingConfig, ValidationConfig, resolve_batch)

ASSETS = Path(__file__).resolve().parent / "assets" / "models"
GIB = 1024**3

# model -> (HF repository whose config.json is in assets, the default checkpoint folder the run loads)
MODELS = {
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-32b": "Qwen/Qwen2.5-32B-Instruct",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B-Instruct",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3.1-70b": "meta-llama/Llama-3.1-70B-Instruct",
}
# KD teachers share the student's tokenizer and vocabulary
TEACHERS = {"qwen2.5-1.5b": "qwen2.5-7b", "qwen2.5-7b": "qwen2.5-32b", "llama3.1-8b": "llama3.1-70b",
            "qwen2.5-32b": "qwen2.5-72b"}


def hf_config_path(model: str) -> str:
    return f"recipes/assets/models/{model}/config.json"


def default_checkpoint(model: str) -> str:
    return f"checkpoints/{MODELS[model]}"


def choose_layout(model: str, seq_length: int, nodes: int, gpus_per_node: int, global_batch: int,
                  layout: planner.Layout | None = None, **plan_kwargs) -> tuple[planner.Layout, planner.Plan]:
    """The planner's best layout for the model on `nodes` x `gpus_per_node` H100s, or `layout` checked."""
    from recipes.megatron.providers import load_hf_config

    hf = load_hf_config(resolve_path(hf_config_path(model)))
    world = nodes * gpus_per_node
    if layout is not None:
        if layout.world != world:
            raise ValueError(f"{model}: layout {layout.describe()} has {layout.world} ranks but {nodes} node(s) x "
                             f"{gpus_per_node} GPUs = {world}")
        if layout.tp > gpus_per_node:
            raise ValueError(f"{model}: tp={layout.tp} would span nodes ({gpus_per_node} GPUs per node)")
        grad_acc = global_batch // (layout.micro_batch_size * layout.dp)
        pl = planner.plan(hf, layout, seq_length, grad_acc, **plan_kwargs)
        if not pl.fits():
            raise ValueError(f"{model}: {layout.describe()} needs {pl.total_gib:.1f} GiB per GPU at {seq_length} "
                             f"tokens (> {planner.USABLE_FRACTION:.0%} of 80 GiB)")
        return layout, pl
    plans = planner.search(hf, seq_length, nodes, gpus_per_node, global_batch, **plan_kwargs)
    if not plans:
        raise ValueError(f"{model}: no layout of {nodes} node(s) x {gpus_per_node} H100s fits {seq_length}-token "
                         f"rows with a global batch of {global_batch}: use more nodes or shorter rows")
    return plans[0].layout, plans[0]


def _parallel(layout: planner.Layout, nodes: int) -> ParallelConfig:
    return ParallelConfig(tp=layout.tp, pp=layout.pp, cp=layout.cp, dp=layout.dp, nodes=nodes,
                          distributed_optimizer=layout.distributed_optimizer,
                          sequence_parallel=layout.sequence_parallel, recompute=layout.recompute)


def _training(layout: planner.Layout, global_batch: int, lr: float, max_steps: int) -> TrainingConfig:
    return TrainingConfig(global_batch_size=global_batch, micro_batch_size=layout.micro_batch_size, lr=lr,
                          min_lr=lr / 10, warmup_steps=min(100, max_steps // 10), weight_decay=0.01,
                          adam_beta2=0.95, grad_clip=1.0, max_steps=max_steps, precision="bf16", threads=None)


def sft_recipe(model: str, nodes: int = 1, gpus_per_node: int = 8, seq_length: int = 16384,
               global_batch_size: int = 128, lr: float = 1e-5, train_path: str | None = "runs/curate/corpus",
               max_steps: int = 2000, hf_checkpoint: str | None = None,
               layout: planner.Layout | None = None) -> SFTConfig:
    """SFT on long chain-of-thought traces (packed rows of `seq_length` tokens)."""
    lay, _ = choose_layout(model, seq_length, nodes, gpus_per_node, global_batch_size, layout)
    cfg = SFTConfig(
        output_dir=f"runs/{model}-sft",
        model=ModelConfig(hf_config=hf_config_path(model), init_checkpoint=hf_checkpoint or default_checkpoint(model)),
        data=DataConfig(train_path=train_path, seq_length=seq_length, packing=True, on_bad_record="skip"),
        parallel=_parallel(lay, nodes),
        training=_training(lay, global_batch_size, lr, max_steps),
        validation=ValidationConfig(every_steps=200, max_rows=256),
        checkpoint=CheckpointConfig(every_steps=200, keep_last=2, resume=True),
        logging=LoggingConfig(every_steps=10, tensorboard=True, progress=False),
    )
    resolve_batch(cfg)
    return cfg


def lora_recipe(model: str, nodes: int = 1, gpus_per_node: int = 1, seq_length: int = 16384,
                global_batch_size: int = 64, lr: float = 1e-4, r: int = 16, train_path: str | None = "runs/curate/corpus",
                max_steps: int = 2000, hf_checkpoint: str | None = None,
                layout: planner.Layout | None = None) -> SFTConfig:
    """LoRA SFT (rank `r` on every linear layer, the base frozen) on long chain-of-thought traces: with no
    gradients or Adam state for the base, a 7-8B student trains on one H100."""
    from recipes.megatron.lora import LoraConfig, PeftConfig

    lay, _ = choose_layout(model, seq_length, nodes, gpus_per_node, global_batch_size, layout, lora_r=r)
    cfg = SFTConfig(
        output_dir=f"runs/{model}-lora",
        model=ModelConfig(hf_config=hf_config_path(model), init_checkpoint=hf_checkpoint or default_checkpoint(model)),
        data=DataConfig(train_path=train_path, seq_length=seq_length, packing=True, on_bad_record="skip"),
        parallel=_parallel(lay, nodes),
        training=dataclasses.replace(_training(lay, global_batch_size, lr, max_steps), weight_decay=0.0),
        validation=ValidationConfig(every_steps=200, max_rows=256),
        checkpoint=CheckpointConfig(every_steps=200, keep_last=2, resume=True),
        logging=LoggingConfig(every_steps=10, tensorboard=True, progress=False),
        peft=PeftConfig(LoraConfig(enabled=True, r=r, alpha=2.0 * r, dropout=0.05)),
    )
    resolve_batch(cfg)
    return cfg


def kd_recipe(model: str, nodes: int = 1, gpus_per_node: int = 8, seq_length: int = 16384,
              global_batch_size: int = 128, lr: float = 1e-5, train_path: str | None = "runs/curate/corpus",
              max_steps: int = 2000,
              hf_checkpoint: str | None = None, teacher: str | None = None, teacher_checkpoint: str | None = None,
              layout: planner.Layout | None = None):
    """Logit KD from a larger model of the same family (same tokenizer), held frozen with the student's layout."""
    from recipes.kd import KDConfig, KDLossConfig, TeacherModelConfig
    from recipes.megatron.providers import load_hf_config

    teacher = teacher or TEACHERS[model]
    t_hf = load_hf_config(resolve_path(hf_config_path(teacher)))
    lay, _ = choose_layout(model, seq_length, nodes, gpus_per_node, global_batch_size, layout, teacher_hf=t_hf)
    base = sft_recipe(model, nodes, gpus_per_node, seq_length, global_batch_size, lr, train_path, max_steps,
                      hf_checkpoint, lay)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(SFTConfig)}
    return KDConfig(**{**fields, "output_dir": f"runs/{model}-kd"},
                    teacher=TeacherModelConfig(hf_config=hf_config_path(teacher),
                                               checkpoint=teacher_checkpoint or default_checkpoint(teacher)),
                    kd=KDLossConfig(kind="forward", temperature=1.0, kd_weight=0.5))


def grpo_recipe(model: str, nodes: int = 1, gpus_per_node: int = 8, max_tokens: int = 8192,
                prompts_per_step: int = 64, group_size: int = 8, lr: float = 1e-6, steps: int = 500,
                prompts_dataset: str | None = None, hf_checkpoint: str | None = None,
                gpu_memory_utilization: float = 0.4, engine_tp: int | None = None,
                layout: planner.Layout | None = None):
    """GRPO (DAPO loss) on verifiable rewards; the rollout engine (vLLM, bf16, `engine_tp` GPUs: by default the
    fewest that hold its weights in a quarter of its share) on the trainer's GPUs, asleep while the trainer
    trains."""
    from recipes.grpo import GRPOConfig, GRPOSettings, PromptsConfig
    from recipes.rl.losses import LossConfig
    from recipes.rl.rollout import RolloutConfig
    from recipes.trainer import OptimizerConfig

    from recipes.megatron.providers import load_hf_config

    rows = prompts_per_step * group_size
    seq = planner.GRPO_PROMPT_TOKENS + max_tokens
    hf = load_hf_config(resolve_path(hf_config_path(model)))
    if engine_tp is None:
        share = gpu_memory_utilization * 80 * GIB / 4
        engine_tp = next(t for t in (1, 2, 4, 8) if planner.engine_bytes(hf, t, 0) <= share or t == 8)
    minibatches = 4
    engine = {"tp": engine_tp, "gpu_memory_utilization": gpu_memory_utilization, "sleep": True}
    lay, _ = choose_layout(model, seq, nodes, gpus_per_node, rows // minibatches, layout, engine=engine)
    cfg = GRPOConfig(
        output_dir=f"runs/{model}-grpo",
        model=ModelConfig(hf_config=hf_config_path(model), init_checkpoint=hf_checkpoint or default_checkpoint(model)),
        parallel=_parallel(lay, nodes),
        training=OptimizerConfig(lr=lr, min_lr=lr, warmup_steps=0, weight_decay=0.0, precision="bf16",
                                 threads=None),
        grpo=GRPOSettings(steps=steps, prompts_per_step=prompts_per_step, group_size=group_size,
                          minibatches=minibatches, micro_batch_size=lay.micro_batch_size),
        rollout=RolloutConfig(max_tokens=max_tokens, dtype="bfloat16", gpu_memory_utilization=gpu_memory_utilization,
                              tensor_parallel_size=engine_tp, colocated_sleep=True),
        loss=LossConfig(variant="dapo"),
        prompts=PromptsConfig(dataset=prompts_dataset),
        checkpoint=CheckpointConfig(every_steps=20, keep_last=2, resume=True),
        logging=LoggingConfig(every_steps=1, tensorboard=True, progress=False),
    )
    return cfg


def opd_recipe(model: str, nodes: int = 1, gpus_per_node: int = 8, max_tokens: int = 8192,
               prompts_per_step: int = 64, group_size: int = 4, lr: float = 1e-6, steps: int = 300,
               prompts_dataset: str | None = None, hf_checkpoint: str | None = None, teacher: str | None = None,
               teacher_checkpoint: str | None = None, gpu_memory_utilization: float = 0.3,
               layout: planner.Layout | None = None):
    """On-policy distillation: the student samples (vLLM on the trainer's GPUs, asleep while it trains), a larger
    model of its family (same tokenizer) held frozen in the student's layout scores the sampled tokens, and
    log p_teacher - log p_student of each token is its advantage."""
    from recipes.distillation import DistillConfig
    from recipes.megatron.providers import load_hf_config

    teacher = teacher or TEACHERS[model]
    t_hf = load_hf_config(resolve_path(hf_config_path(teacher)))
    rows = prompts_per_step * group_size
    hf = load_hf_config(resolve_path(hf_config_path(model)))
    share = gpu_memory_utilization * 80 * GIB / 4
    engine_tp = next(t for t in (1, 2, 4, 8) if planner.engine_bytes(hf, t, 0) <= share or t == 8)
    engine = {"tp": engine_tp, "gpu_memory_utilization": gpu_memory_utilization, "sleep": True}
    seq = planner.GRPO_PROMPT_TOKENS + max_tokens
    lay, _ = choose_layout(model, seq, nodes, gpus_per_node, rows // 4, layout, engine=engine, teacher_hf=t_hf)
    cfg = grpo_recipe(model, nodes, gpus_per_node, max_tokens, prompts_per_step, group_size, lr, steps,
                      prompts_dataset, hf_checkpoint, gpu_memory_utilization, engine_tp, lay)
    return dataclasses.replace(cfg, output_dir=f"runs/{model}-opd", distill=DistillConfig(
        teacher=teacher_checkpoint or default_checkpoint(teacher), teacher_hf_config=hf_config_path(teacher),
        mode="on_policy"))


STAGE_OF = {"sft": "sft", "kd": "kd", "grpo": "grpo", "opd": "grpo", "lora": "sft"}  # recipe kind -> the stage that runs it


def _named(kind: str, model: str, default_nodes: int):
    factory = {"sft": sft_recipe, "kd": kd_recipe, "grpo": grpo_recipe, "opd": opd_recipe, "lora": lora_recipe}[kind]

    def recipe(nodes: int = default_nodes, **kwargs):
        return factory(model, nodes=nodes, **kwargs)

    recipe.__name__ = f"{model.replace('.', 'p').replace('-', '_')}_{kind}"
    recipe.__doc__ = f"{kind.upper()} of {MODELS[model]} on {default_nodes} H100 node(s) by default. " + \
        (factory.__doc__ or "")
    return recipe


# the students and the node counts their recipes default to (the 32B student needs 4+ nodes)
STUDENTS = {"qwen2.5-1.5b": 1, "qwen2.5-7b": 2, "llama3.1-8b": 2, "qwen2.5-32b": 4}
OPD_STUDENTS = {"qwen2.5-1.5b": 1, "qwen2.5-7b": 2}  # with the teacher (7B, 32B) held in the same job
RECIPES = {f"{m}-{k}": _named(k, m, n) for m, n in STUDENTS.items() for k in ("sft", "kd", "grpo")}
RECIPES.update({f"{m}-opd": _named("opd", m, n) for m, n in OPD_STUDENTS.items()})
RECIPES.update({f"{m}-lora": _named("lora", m, 1) for m in ("qwen2.5-7b", "llama3.1-8b")})  # one H100
qwen25_1p5b_sft, qwen25_7b_sft = RECIPES["qwen2.5-1.5b-sft"], RECIPES["qwen2.5-7b-sft"]
llama31_8b_sft, qwen25_32b_sft = RECIPES["llama3.1-8b-sft"], RECIPES["qwen2.5-32b-sft"]
qwen25_1p5b_kd, qwen25_7b_kd = RECIPES["qwen2.5-1.5b-kd"], RECIPES["qwen2.5-7b-kd"]
llama31_8b_kd, qwen25_32b_kd = RECIPES["llama3.1-8b-kd"], RECIPES["qwen2.5-32b-kd"]
qwen25_1p5b_grpo, qwen25_7b_grpo = RECIPES["qwen2.5-1.5b-grpo"], RECIPES["qwen2.5-7b-grpo"]
llama31_8b_grpo, qwen25_32b_grpo = RECIPES["llama3.1-8b-grpo"], RECIPES["qwen2.5-32b-grpo"]


def yaml_path(name: str) -> Path:
    model, kind = name.rsplit("-", 1)
    if STAGE_OF[kind] != kind:  # a recipe of another stage's kind: nemo_configs/<stage>/<model>_<kind>_h100.yaml
        return Path("nemo_configs") / STAGE_OF[kind] / f"{model}_{kind}_h100.yaml"
    return Path("nemo_configs") / kind / f"{model}_h100.yaml"


def describe(cfg) -> str:
    p = cfg.parallel
    return (f"{cfg.model.hf_config} from {cfg.model.init_checkpoint}: {p.nodes} node(s)\n"
            + planner.plan_table(cfg))


def write_yaml(cfg, path: str | Path, name: str = "") -> Path:
    """The config as YAML with its plan in a header comment."""
    from recipes.config import save_config

    path = save_config(cfg, path)
    header = [f"Written by `python -m recipes.named_recipes --write` from RECIPES[{name!r}] (recipes/named_recipes.py):",
              "edit the function, not this file, for lasting changes. Per-GPU memory plan (recipes/planner.py):",
              *describe(cfg).splitlines()]
    Path(path).write_text("".join(f"# {line}\n" for line in header) + Path(path).read_text())
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    for name, factory in RECIPES.items():
        cfg = factory()
        print(f"## {name}\n{describe(cfg)}\n")
        if "--write" in args:
            write_yaml(cfg, resolve_path(str(yaml_path(name))), name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
