"""The HTML report of one or several evaluation runs, side by side (plots embedded as base64 PNGs).

    write_eval_report([run_a, run_b], "report.html")

A run is an output folder of `nrr eval run` (summary.json plus one samples JSONL per benchmark).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from recipes.evaluation.records import read_records


def load_run(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no summary.json (is it an `nrr eval run` output folder?)")
    summary = json.loads(path.read_text(encoding="utf-8"))
    summary["records"] = {b: read_records(Path(run_dir) / f"{b}.jsonl") for b in summary["benchmarks"]}
    summary.setdefault("run", Path(run_dir).name)
    return summary


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _log2_percent_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=7)


def _plots(runs: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots = []
    benches = sorted({b for r in runs for b in r["benchmarks"]})
    width = 0.8 / max(1, len(runs))

    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(benches)), 3.6))
    x = np.arange(len(benches))
    for i, run in enumerate(runs):
        acc = [run["benchmarks"].get(b, {}).get("pass@1", 0.0) * 100 for b in benches]
        err = [run["benchmarks"].get(b, {}).get("pass@1_se", 0.0) * 100 for b in benches]
        ax.bar(x + i * width - 0.4 + width / 2, acc, width, yerr=err, capsize=3, label=run["run"])
    ax.set_xticks(x, benches, rotation=20)
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy per benchmark (error bars: standard error)")
    plots.append(("Accuracy per benchmark", _png(fig)))

    fig, axes = plt.subplots(1, len(benches), figsize=(4 * len(benches), 3.2), squeeze=False)
    for ax, b in zip(axes[0], benches):
        for run in runs:
            curve = run["benchmarks"].get(b, {}).get("pass@k", {})
            if curve:
                ks = sorted(int(k) for k in curve)
                ax.plot(ks, [curve[str(k)] * 100 for k in ks], marker="o", label=f"{run['run']} pass@k")
            maj = run["benchmarks"].get(b, {}).get("maj@k", {})
            if maj:
                ks = sorted(int(k) for k in maj)
                ax.plot(ks, [maj[str(k)] * 100 for k in ks], marker="x", linestyle="--", label=f"{run['run']} maj@k")
        _log2_percent_axes(ax, "k", "%", b)
    plots.append(("pass@k and maj@k", _png(fig)))

    fig, axes = plt.subplots(1, len(benches), figsize=(4 * len(benches), 3.2), squeeze=False)
    for ax, b in zip(axes[0], benches):
        for run in runs:
            recs = run["records"].get(b, [])
            for correct, style in ((True, "-"), (False, ":")):
                lengths = [r["num_generated_tokens"] for r in recs if bool(r["is_correct"]) == correct]
                if lengths:
                    ax.hist(lengths, bins=20, histtype="step", linestyle=style,
                            label=f"{run['run']} {'correct' if correct else 'wrong'}")
        ax.set_xlabel("generated tokens")
        ax.set_ylabel("samples")
        ax.set_title(b)
        ax.legend(fontsize=7)
    plots.append(("Response length distributions", _png(fig)))

    level_runs = [(run, b) for run in runs for b in run["benchmarks"] if "by_level" in run["benchmarks"][b]]
    if level_runs:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for run, b in level_runs:
            by = run["benchmarks"][b]["by_level"]
            lv = sorted(by, key=int)
            ax.plot([int(v) for v in lv], [by[v]["pass@1"] * 100 for v in lv], marker="o", label=f"{run['run']} {b}")
        ax.set_xticks(sorted({int(v) for run, b in level_runs for v in run["benchmarks"][b]["by_level"]}))
        ax.set_xlabel("level (operations)")
        ax.set_ylabel("pass@1 (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
        ax.set_title("Accuracy per level")
        plots.append(("Accuracy per level", _png(fig)))

    scaled = [b for b in benches if any(run["benchmarks"].get(b, {}).get("scaling") for run in runs)]
    if scaled:  # test-time scaling: what each way of spending more tokens per problem buys
        fig, axes = plt.subplots(1, len(scaled), figsize=(4.5 * len(scaled), 3.4), squeeze=False)
        for ax, b in zip(axes[0], scaled):
            for run in runs:
                curves = run["benchmarks"].get(b, {}).get("scaling", {})
                for name, marker in (("self_consistency", "o"), ("best_of", "s"), ("budget_forcing", "^")):
                    points = curves.get(name) or []
                    if points:
                        ax.plot([pt["tokens"] for pt in points], [pt["accuracy"] * 100 for pt in points],
                                marker=marker, label=f"{run['run']} {name.replace('_', ' ')}")
            _log2_percent_axes(ax, "generated tokens per problem", "accuracy (%)", b)
        plots.append(("Accuracy against generated tokens (test-time scaling)", _png(fig)))
    return plots


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{100 * v:.1f}"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def _table(runs: list[dict]) -> str:
    head = ("run", "benchmark", "problems", "k", "pass@1 %", "± se", "pass@k %", "maj@k %", "tokens",
            "thinking tok (correct / wrong)", "reflection rate %", "format %", "truncated %")
    rows = []
    for run in runs:
        for b, m in run["benchmarks"].items():
            n = m.get("samples_per_problem", 1)
            L = m.get("lengths", {}).get("thinking_tokens", {})
            rows.append((
                run["run"], b, m.get("problems"), n, _fmt(m.get("pass@1"), True), _fmt(m.get("pass@1_se"), True),
                _fmt(m.get("pass@k", {}).get(str(n)), True), _fmt(m.get("maj@k", {}).get(str(n)), True),
                _fmt(m.get("lengths", {}).get("num_generated_tokens", {}).get("all")),
                f"{_fmt(L.get('correct'))} / {_fmt(L.get('wrong'))}",
                _fmt(m.get("reflection_rate"), True), _fmt(m.get("format_compliance"), True),
                _fmt(m.get("truncation_rate"), True),
            ))
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _examples(runs: list[dict], per_bench: int = 2) -> str:
    parts = []
    for run in runs:
        for b, recs in run["records"].items():
            for r in recs[:per_bench]:
                verdict = "correct" if r["is_correct"] else "wrong"
                parts.append(
                    f"<details><summary>{html.escape(run['run'])} / {html.escape(b)} / {html.escape(str(r['id']))}"
                    f" #{r['sample_idx']}: {verdict} (predicted {html.escape(str(r['predicted_answer']))}, "
                    f"expected {html.escape(str(r['expected_answer']))})</summary>"
                    f"<pre>{html.escape(r['generation'][:4000])}</pre></details>"
                )
    return "\n".join(parts)


CSS = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#76b900;color:#fff}
td:first-child,td:nth-child(2){text-align:left}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em;font-size:12px}"""


def write_eval_report(run_dirs: list[str | Path], output: str | Path) -> Path:
    runs = [load_run(Path(d)) for d in run_dirs]
    plots = _plots(runs)
    figures = "\n".join(
        f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
        for title, data in plots
    )
    meta = "".join(
        f"<li><b>{html.escape(r['run'])}</b>: model {html.escape(str(r.get('model')))}, backend "
        f"{html.escape(str(r.get('backend')))}, k={r.get('k')}, temperature={r.get('temperature')}, "
        f"thinking={r.get('thinking')}</li>"
        for r in runs
    )
    doc = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Evaluation report</title>"
        f"<style>{CSS}</style></head><body><h1>Evaluation report</h1><ul>{meta}</ul>"
        f"<h2>Summary</h2>{_table(runs)}{figures}<h2>Sample responses</h2>{_examples(runs)}</body></html>"
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(doc, encoding="utf-8")
    return output
