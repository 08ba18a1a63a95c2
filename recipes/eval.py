"""`nrr eval`: evaluate a model on math benchmarks and the embedded task, grade files, compare runs.

    nrr eval run --config nemo_configs/eval/math.yaml model=outputs/sft/hf generation.k=4
    nrr eval grade --input F.jsonl --response-field generation --reference-field answer --output G.jsonl
    nrr eval compare outputs/eval/base outputs/eval/sft --output report.html
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recipes.config import add_config_arguments
from recipes.stages import STAGES

HELP = STAGES["eval"].help
DEFAULT_CONFIG = STAGES["eval"].default_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    run = sub.add_parser("run", help="generate, grade, summarise and report (resumable)")
    add_config_arguments(run, DEFAULT_CONFIG)
    grade = sub.add_parser("grade", help="add predicted_answer and is_correct to every line of a JSONL file")
    grade.add_argument("--input", required=True)
    grade.add_argument("--response-field", required=True, help="the field holding the model's response")
    grade.add_argument("--reference-field", required=True, help="the field holding the reference answer")
    grade.add_argument("--output", required=True)
    grade.add_argument("--timeout", type=float, default=5.0,
                       help="seconds the grading of one response may take on the math-verify path")
    compare = sub.add_parser("compare", help="one HTML report with several runs side by side")
    compare.add_argument("runs", nargs="+", help="output folders of `nrr eval run`")
    compare.add_argument("--output", required=True)


def grade_file(input_path: str, response_field: str, reference_field: str, output_path: str,
               timeout: float = 5.0) -> dict:
    """Grade every line; returns counts. Fails naming the line of a record without the fields."""
    from recipes import grader

    src, dst = Path(input_path), Path(output_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    n = correct = 0
    with src.open(encoding="utf-8") as fin, dst.open("w", encoding="utf-8") as fout:
        for lineno, line in enumerate(fin, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{src}:{lineno}: not JSON: {err}") from None
            for field in (response_field, reference_field):
                if field not in row:
                    raise ValueError(f"{src}:{lineno}: no field '{field}' (fields: {', '.join(row)})")
            result = grader.grade_response(str(row[response_field] or ""), row[reference_field], timeout=timeout)
            row["predicted_answer"] = result.predicted
            row["is_correct"] = result.correct
            fout.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
            correct += result.correct
    return {"graded": n, "correct": correct, "accuracy": correct / n if n else 0.0, "output": str(dst)}


def cli(args: argparse.Namespace) -> int:
    if args.command == "run":
        from recipes.config import load_config
        from recipes.evaluation import run_eval
        from recipes.evaluation.config import EvalConfig

        from recipes.evaluation.runner import GenerationBudgetError
        from recipes.generation.openai_endpoint import EndpointAuthError

        cfg = load_config(EvalConfig, args.config, args.overrides)
        try:
            summary = run_eval(cfg)
        except (GenerationBudgetError, EndpointAuthError) as err:
            print(f"nrr eval run: {err}", file=sys.stderr)
            return 1
        runs = summary["models"] if cfg.models else {None: summary}
        for model, run in runs.items():
            for name, m in run["benchmarks"].items():
                name = f"{model}/{name}" if model else name
                print(f"{name:>16}: pass@1 {100 * m.get('pass@1', 0):5.1f}% ± {100 * m.get('pass@1_se', 0):.1f} "
                      f"over {m.get('problems', 0)} problems x {m.get('samples_per_problem', 0)} samples")
        summaries = [f"{cfg.output_dir}/{m}/summary.json" for m in cfg.models] or [f"{cfg.output_dir}/summary.json"]
        print("outputs: " + ", ".join(summaries) + (f", {cfg.output_dir}/report.html" if cfg.report else ""))
        return 0
    if args.command == "grade":
        try:
            result = grade_file(args.input, args.response_field, args.reference_field, args.output, args.timeout)
        except (OSError, ValueError) as err:
            print(f"nrr eval grade: {err}", file=sys.stderr)
            return 2
        print(json.dumps(result))
        return 0
    if args.command == "compare":
        from recipes.evaluation.report import write_eval_report

        try:
            path = write_eval_report(args.runs, args.output)
        except FileNotFoundError as err:
            print(f"nrr eval compare: {err}", file=sys.stderr)
            return 2
        print(f"report: {path}")
        return 0
    return 2
