"""`nrr convert`: Hugging Face <-> Megatron checkpoints, and the random-init base checkpoint of the demo.

    nrr convert from-hf --hf HF_DIR --out CKPT [--tp N --pp N]
    nrr convert to-hf   --ckpt CKPT --out HF_DIR [--step N] [--tp N --pp N] [--merge-lora | --lora-adapter]
    nrr convert init    --config CONFIG_JSON --out CKPT [--seed S]

The conversion itself (and its Python API) is `recipes.megatron.hf_checkpoint`. `to-hf` writes `<out>.tmp` and
renames it into place when complete, so an interrupted export leaves a previous one intact; it checks the step's
checksums first (without `--step`, a corrupt latest step falls back to the newest complete one, with a warning).
A LoRA checkpoint (adapters only, `peft.lora.enabled`) exports either merged into its base (`--merge-lora`: a
plain HF model) or as a PEFT adapter for the HF export of its base (`--lora-adapter`: adapter_config.json +
adapter_model.safetensors). One process is enough for tiny models; `--tp/--pp` > 1 re-launches this module under
`python -m torch.distributed.run --nproc_per_node TP*PP` so each rank holds only its shard.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from recipes.megatron.hf_checkpoint import export_lora_adapter, export_to_hf, import_from_hf, init_tiny_checkpoint
from recipes.stages import STAGES

HELP = STAGES["convert"].help

# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("from-hf", help="HF folder -> Megatron checkpoint")
    a.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors [+ tokenizer])")
    a.add_argument("--out", required=True, help="Megatron checkpoint folder to write")
    b = sub.add_parser("to-hf", help="Megatron checkpoint -> HF folder")
    b.add_argument("--ckpt", required=True, help="Megatron checkpoint folder (holds hf_config.json, latest)")
    b.add_argument("--out", required=True, help="HF folder to write")
    b.add_argument("--step", type=int, default=None, help="step to export (default: latest)")
    lora = b.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", action="store_true", help="a LoRA checkpoint: merge the adapters into the base")
    lora.add_argument("--lora-adapter", action="store_true",
                      help="a LoRA checkpoint: write the adapters in PEFT format (for the base's HF export)")
    c = sub.add_parser("init", help="random-init Megatron checkpoint from an HF config.json")
    c.add_argument("--config", required=True, help="HF config.json (or its folder)")
    c.add_argument("--out", required=True)
    c.add_argument("--seed", type=int, default=0)
    for p in (a, b):
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks used for the conversion")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks used for the conversion")


def _relaunch(args: argparse.Namespace, argv: list[str]) -> int:
    n = args.tp * args.pp
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "recipes.convert", *argv]
    print(f"nrr convert: launching {n} ranks: {' '.join(cmd)}", file=sys.stderr)
    return subprocess.call(cmd)


def _argv(args: argparse.Namespace) -> list[str]:
    if args.direction == "from-hf":
        out = ["from-hf", "--hf", args.hf, "--out", args.out]
    else:
        out = ["to-hf", "--ckpt", args.ckpt, "--out", args.out] + ([] if args.step is None else ["--step", str(args.step)])
        out += ["--merge-lora"] * args.merge_lora + ["--lora-adapter"] * args.lora_adapter
    return out + ["--tp", str(args.tp), "--pp", str(args.pp)]


def cli(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:  # corrupt checkpoints: ValueError
        print(f"nrr convert: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.direction == "init":
        path = init_tiny_checkpoint(args.config, args.out, args.seed)
        print(f"wrote random-init checkpoint {path}")
        return 0
    if args.tp * args.pp > 1 and "RANK" not in os.environ:
        return _relaunch(args, _argv(args))
    if args.direction == "from-hf":
        path = import_from_hf(args.hf, args.out, args.tp, args.pp)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"wrote Megatron checkpoint {path}")
    elif args.lora_adapter:
        if args.pp != 1:
            raise ValueError("--lora-adapter: export at --pp 1 (the checkpoint loads at any layout)")
        path = export_lora_adapter(args.ckpt, args.out, args.step, args.tp)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"wrote PEFT adapter {path}")
    else:
        path = export_to_hf(args.ckpt, args.out, args.step, args.tp, args.pp, merge_lora=args.merge_lora)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"wrote HF model {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nrr convert", description=HELP)
    add_arguments(parser)
    return cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
