"""Evaluation of reasoning: benchmarks, metrics and the HTML report.

    from recipes.evaluation import evaluate_model, run_eval
    summary = evaluate_model("outputs/sft/hf", benchmark="embedded", levels=[1, 2, 3], backend="hf")

`run_eval(cfg)` is what `nrr eval run` calls; `evaluate_model` builds that config for other stages.
"""

from recipes.evaluation.runner import evaluate_model, run_eval

__all__ = ["evaluate_model", "run_eval"]
