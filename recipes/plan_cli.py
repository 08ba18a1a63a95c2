"""`nrr plan`: the per-GPU memory plan of a training layout, and the layouts that fit.

    nrr plan                                         # every named H100 recipe at the layout it ships with
    nrr plan qwen2.5-7b-sft llama3.1-8b-grpo         # some of them
    nrr plan --stage sft --config my_sft.yaml parallel.tp=4   # a config (with overrides) and its alternatives
    nrr plan --model /models/Qwen2.5-7B-Instruct --seq-length 16384 --nodes 2   # search for any HF model

A config or model is planned on `--gpus-per-node` GPUs of `--gpu-memory-gib` each; the search varies TP, PP, CP,
DP, recompute and micro batch (`recipes.planner.search`) and prints the `--top` layouts, best first. The exit code
is 2 when the config's own layout, or every layout searched, does not fit.
"""

from __future__ import annotations

import argparse
import sys

# the training stages and their typed config classes ("module:class")
CONFIG_CLASSES = {"sft": "recipes.trainer:SFTConfig", "kd": "recipes.kd:KDConfig", "grpo": "recipes.grpo:GRPOConfig"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipes", nargs="*", metavar="RECIPE", help="named recipes (default: all of them)")
    parser.add_argument("--stage", choices=sorted(CONFIG_CLASSES), help="plan this stage's --config")
    parser.add_argument("--config", help="a training config (YAML) of --stage; key=value overrides follow")
    parser.add_argument("--model", help="search layouts for this HF model (a folder with config.json, or the file)")
    parser.add_argument("--seq-length", type=int, default=16384, help="tokens per row (--model)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (--model; a config's parallel.nodes otherwise)")
    parser.add_argument("--global-batch", type=int, default=128, help="rows per optimizer step (--model)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="parameter dtype (--model)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--no-cp", action="store_true", help="no context parallelism (no Transformer Engine)")
    parser.add_argument("--top", type=int, default=8, help="layouts to print from the search")


def _search_table(plans: list, args: argparse.Namespace, what: str) -> int:
    from recipes import planner

    if not plans:
        print(f"nothing fits {what} on {args.gpus_per_node} x {args.gpu_memory_gib:.0f} GiB GPUs per node "
              f"(at most {planner.USABLE_FRACTION:.0%} of each is planned)", file=sys.stderr)
        return 2
    print(f"{len(plans)} layouts fit {what}; the best {min(args.top, len(plans))} by the step-time heuristic "
          f"(recipes.planner.relative_step_time):")
    print(planner.plans_table(plans[:args.top], args.gpu_memory_gib))
    return 0


def cli(args: argparse.Namespace) -> int:
    from recipes import planner
    from recipes.config import ConfigError, load_config

    if args.model:
        from recipes.megatron.providers import load_hf_config

        try:
            hf = load_hf_config(args.model)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"--model: {err}") from None
        plans = planner.search(hf, args.seq_length, args.nodes, args.gpus_per_node, args.global_batch,
                               args.gpu_memory_gib, args.precision, not args.no_cp)
        return _search_table(plans, args, f"{args.model} at {args.seq_length} tokens on {args.nodes} node(s)")
    if args.config or args.stage:
        if not (args.config and args.stage):
            raise ConfigError("--config and --stage go together (the stage names the config's class)")
        import importlib

        module, name = CONFIG_CLASSES[args.stage].split(":")
        cfg = load_config(getattr(importlib.import_module(module), name), args.config, args.recipes)
        gpus = cfg.parallel.nodes * args.gpus_per_node
        print(f"{args.config}: {cfg.parallel.nodes} node(s) x {args.gpus_per_node} GPUs")
        from recipes.trainer import world_size

        if world_size(cfg) != gpus:
            print(f"note: the layout has {world_size(cfg)} ranks for {gpus} GPUs (`nrr launch` refuses "
                  "it)", file=sys.stderr)
        print(planner.plan_table(cfg, args.gpu_memory_gib))
        plans = planner.search_config(cfg, args.gpus_per_node, not args.no_cp, args.gpu_memory_gib)
        print()
        searched = _search_table(plans, args, f"{args.config} on {cfg.parallel.nodes} node(s)")
        planner.check_fits(cfg, args.gpu_memory_gib)
        return searched
    from recipes.named_recipes import RECIPES, describe

    unknown = [n for n in args.recipes if n not in RECIPES]
    if unknown:
        raise ConfigError(f"no named recipe {', '.join(unknown)}; there are: {', '.join(RECIPES)}")
    for name in args.recipes or RECIPES:
        print(f"## {name}\n{describe(RECIPES[name]())}\n")
    return 0

