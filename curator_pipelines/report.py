"""Stage 8b: the run report: counts in/out per stage with reasons (JSON + markdown), length
histograms and the teacher's pass-rate distribution (PNG), and, when the teacher labels its
responses (the embedded teacher does), how each defect class fared against the filters.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import DocumentBatch

from curator_pipelines.decontam import MATCHES
from curator_pipelines.records import FAILURES
from curator_pipelines.records import STAGE_LOG

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def label_scorecard(df: pd.DataFrame) -> dict:
    """Per teacher label: how many records, how many the curation removed (selection's cap aside)."""
    if "teacher_label" not in df or df["teacher_label"].isna().all():
        return {}
    removed = ~df["kept"] & ~df["dropped_by"].isin(["select"])
    out = {}
    for label, group in df.groupby(df["teacher_label"].fillna("unlabelled")):
        rem = removed.loc[group.index]
        out[label] = {
            "records": int(len(group)),
            "removed": int(rem.sum()),
            "removed_share": round(float(rem.mean()), 4),
            "removed_by": {k: int(v) for k, v in group.loc[rem, "dropped_by"].value_counts().items()},
        }
    return out


def _hist(values, bins) -> dict:
    counts, edges = np.histogram(np.asarray(values, dtype=float), bins=bins)
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}


def thinking_split(df: pd.DataFrame, metadata: dict) -> dict:
    """Think / no-think records in the corpus, and as read from a trace dataset (its own split)."""
    kept = df.loc[df["kept"], "enable_thinking"].astype(bool) if "enable_thinking" in df else pd.Series(dtype=bool)
    out = {"corpus": {"think": int(kept.sum()), "no_think": int((~kept).sum())}}
    read = next((s for s in metadata.get(STAGE_LOG, []) if s["stage"] == "read" and "think" in s), None)
    if read is not None:
        out["read"] = {"think": read["think"], "no_think": read["no_think"]}
    return out


def build_report(df: pd.DataFrame, metadata: dict, name: str) -> dict:
    tokens = df["f_length_score"].dropna() if "f_length_score" in df else pd.Series(dtype=float)
    kept_tokens = df.loc[df["kept"], "f_length_score"].dropna() if "f_length_score" in df else tokens
    # problems without a reference (a trace dataset's) have no pass rate
    rates = (df.groupby("problem_id", sort=False)["pass_rate"].first().dropna() if "pass_rate" in df
             else pd.Series(dtype=float))
    removed_reasons = df.loc[~df["kept"]].groupby(["dropped_by", "drop_reason"]).size()
    bins = np.linspace(0, max(float(tokens.max()) if len(tokens) else 1.0, 1.0), 21)
    return {
        "name": name,
        "status": "ok",
        "problems": int(df["problem_id"].nunique()),
        "records": int(len(df)),
        "corpus": int(df["kept"].sum()),
        "stages": metadata.get(STAGE_LOG, []),
        "removed": [{"stage": s, "reason": r, "count": int(c)} for (s, r), c in removed_reasons.items()],
        "generation_failures": metadata.get(FAILURES),
        "thinking": thinking_split(df, metadata),
        "teacher_labels": label_scorecard(df),
        "decontamination": {"sources": metadata.get("nrr_decontam_sources", {}),
                            "matches": len(metadata.get(MATCHES, [])),
                            "examples": metadata.get(MATCHES, [])[:50]},
        "pass_rate": _hist(rates, np.linspace(0, 1, 11)) | {"mean": round(float(rates.mean()), 4) if len(rates) else None},
        "tokens": {"all": _hist(tokens, bins), "corpus": _hist(kept_tokens, bins),
                   "corpus_mean": round(float(kept_tokens.mean()), 2) if len(kept_tokens) else None},
    }


def markdown(report: dict) -> str:
    read = report["stages"][0] if report["stages"] else {}
    origin = (f"read from `{read['dataset']}` (schema {', '.join(read['schema'])})" if "dataset" in read
              else "generated")
    think = report["thinking"]
    split = ", ".join(f"{k} {v['think']} / {v['no_think']}" for k, v in think.items() if k != "corpus")
    lines = [f"# Curation report: {report['name']}", "",
             f"{report['problems']} problems, {report['records']} records {origin}, "
             f"**{report['corpus']} in the corpus**.", "",
             f"Think / no-think records: corpus {think['corpus']['think']} / {think['corpus']['no_think']}"
             + (f"; {split}." if split else "."), "",
             "| stage | in | out | removed | reasons | seconds |", "|---|---:|---:|---:|---|---:|"]
    for s in report["stages"]:
        reasons = ", ".join([f"{k}: {v}" for k, v in s["reasons"].items()]
                            + [f"{k} (kept): {v}" for k, v in s.get("kept_flagged", {}).items()]) or "-"
        lines.append(f"| {s['stage']} | {s['in']} | {s['out']} | {s['removed']} | {reasons} | {s.get('seconds', '')} |")
    if report["teacher_labels"]:
        lines += ["", "## Teacher labels against the filters", "",
                  "| label | records | removed | share | removed by |", "|---|---:|---:|---:|---|"]
        for label, s in sorted(report["teacher_labels"].items()):
            by = ", ".join(f"{k}: {v}" for k, v in s["removed_by"].items()) or "-"
            lines.append(f"| {label} | {s['records']} | {s['removed']} | {s['removed_share']:.2%} | {by} |")
    d = report["decontamination"]
    lines += failures_markdown(report.get("generation_failures"))
    lines += ["", "## Decontamination", "", f"Sources: {d['sources']}; {d['matches']} problems matched.", ""]
    for m in d["examples"][:10]:
        lines.append(f"- `{m['problem_id']}` matched `{m['source']}` ({m['how']})")
    lines += ["", "## Teacher pass rate per problem", "",
              "| pass rate | problems |", "|---|---:|"]
    pr = report["pass_rate"]
    for lo, hi, c in zip(pr["edges"], pr["edges"][1:], pr["counts"]):
        lines.append(f"| {lo:.1f}-{hi:.1f} | {c} |")
    lines += ["", "![tokens](length_hist.png) ![pass rate](pass_rate_hist.png)", ""]
    return "\n".join(lines)


def failures_markdown(failures: dict | None) -> list[str]:
    """The failed requests by error class against the budget (nothing when none failed)."""
    if not failures or not failures["failed"]:
        return []
    lines = ["", "## Failed generation requests", "",
             f"{failures['failed']} of {failures['requests']} requests ({failures['failed_fraction']:.1%}; "
             f"generation.max_failed_fraction {failures['max_failed_fraction']:.1%}"
             + (", **exceeded**)." if failures["exceeded"] else ")."), "",
             "| error class | requests | example |", "|---|---:|---|"]
    for cls, n in failures["by_class"].items():
        example = failures["examples"].get(cls, "").replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {cls} | {n} | {example} |")
    return lines


def write_failed_report(out_dir: Path, name: str, metadata: dict, error: str) -> dict:
    """The report of a run stopped at generation: the stages so far and the failures by class."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"name": name, "status": "failed", "error": error, "stages": metadata.get(STAGE_LOG, []),
              "generation_failures": metadata.get(FAILURES)}
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    lines = [f"# Curation report: {name}", "", f"**Failed**: {error}", "",
             "| stage | in | out | removed | reasons |", "|---|---:|---:|---:|---|"]
    for s in report["stages"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in s["reasons"].items()) or "-"
        lines.append(f"| {s['stage']} | {s['in']} | {s['out']} | {s['removed']} | {reasons} |")
    lines += failures_markdown(report["generation_failures"]) + [""]
    (out_dir / REPORT_MD).write_text("\n".join(lines), encoding="utf-8")
    return report


def plot(report: dict, df: pd.DataFrame, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if "f_length_score" in df:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        edges = report["tokens"]["all"]["edges"]
        ax.hist(df["f_length_score"].dropna(), bins=edges, alpha=0.5, label="judged by the length filter")
        ax.hist(df.loc[df["kept"], "f_length_score"].dropna(), bins=edges, alpha=0.8, label="corpus")
        ax.set_xlabel("tokens (prompt + response, student template)")
        ax.set_ylabel("records")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "length_hist.png", dpi=100)
        plt.close(fig)
        files.append("length_hist.png")
    if "pass_rate" in df:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(df.groupby("problem_id")["pass_rate"].first().dropna(), bins=np.linspace(0, 1, 11))
        ax.set_xlabel("teacher pass rate")
        ax.set_ylabel("problems")
        fig.tight_layout()
        fig.savefig(out_dir / "pass_rate_hist.png", dpi=100)
        plt.close(fig)
        files.append("pass_rate_hist.png")
    return files


def write_curation_report(df: pd.DataFrame, metadata: dict, out_dir: Path, name: str, histograms: bool = True) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(df, metadata, name)
    if histograms:
        report["plots"] = plot(report, df, out_dir)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out_dir / REPORT_MD).write_text(markdown(report), encoding="utf-8")
    return report


class ReportStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    name = "report"
    resources = Resources(cpus=1.0)

    def __init__(self, out_dir: str, run_name: str, histograms: bool = True):
        self.out_dir = out_dir
        self.run_name = run_name
        self.histograms = histograms

    def process(self, task: DocumentBatch) -> DocumentBatch:
        started = time.perf_counter()
        write_curation_report(task.to_pandas(), task._metadata, Path(self.out_dir), self.run_name, self.histograms)
        metadata = dict(task._metadata)
        metadata["nrr_report_seconds"] = round(time.perf_counter() - started, 3)
        return DocumentBatch(dataset_name=task.dataset_name, data=task.data, _metadata=metadata)
