"""The pipeline's summary: the paired gain of one model over another (hand-computed), the report's run section,
and the README block written from a run's files (never typed by hand)."""

from __future__ import annotations

import json
import math

import pytest

from launchers.pipeline import (README_BEGIN, README_END, RUN_INFO, PipelineConfig, gain_cell, paired_gains,
                                splice_readme, summary_markdown)
from launchers.profiles import load_profile
from recipes.config import ConfigError, load_config
from recipes.evaluation.metrics import paired_difference


def sample(pid, level, correct, idx=0):
    return {"id": pid, "sample_idx": idx, "level": level, "is_correct": correct}


# a: p1 right, p2-p4 wrong; b: p1-p3 right, p4 wrong; p5 only in b (not paired)
A = [sample("p1", 1, True), sample("p2", 1, False), sample("p3", 2, False), sample("p4", 2, False)]
B = [sample("p1", 1, True), sample("p2", 1, True), sample("p3", 2, True), sample("p4", 2, False),
     sample("p5", 2, True)]


def test_paired_difference_by_hand():
    out = paired_difference(A, B)
    # differences 0, 1, 1, 0: mean 0.5, sample sd sqrt(1/3), se sqrt(1/3)/2
    assert out["all"]["problems"] == 4
    assert out["all"]["a"] == 0.25 and out["all"]["b"] == 0.75 and out["all"]["diff"] == 0.5
    assert math.isclose(out["all"]["se"], math.sqrt(1 / 3) / 2)
    # level 1: differences 0, 1 -> mean 0.5, sd sqrt(0.5), se 0.5; level 2: 1, 0 -> the same
    for level in ("1", "2"):
        assert out["by_level"][level]["diff"] == 0.5
        assert math.isclose(out["by_level"][level]["se"], 0.5)
    # several samples per problem: a problem's score is its mean over samples
    two = paired_difference([sample("q", 1, True, 0), sample("q", 1, False, 1)], [sample("q", 1, True, 0)])
    assert two["all"]["diff"] == 0.5 and two["all"]["se"] == 0.0


def test_gain_cell_marks_only_gains_beyond_two_standard_errors():
    assert gain_cell({"problems": 4, "diff": 0.068, "se": 0.021}) == "+6.8 ± 2.1 *"
    assert gain_cell({"problems": 4, "diff": -0.02, "se": 0.011}) == "-2.0 ± 1.1"
    assert gain_cell({"problems": 0}) == "-"


def write_run(run_dir, rows):
    for label, (records, pass1) in rows.items():
        d = run_dir / "eval" / label
        d.mkdir(parents=True)
        (d / "embedded.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (d / "summary.json").write_text(json.dumps({"benchmarks": {"embedded": {"pass@1": pass1, "by_level": {
            str(lv): {"pass@1": sum(r["is_correct"] for r in records if r["level"] == lv)
                      / max(1, sum(r["level"] == lv for r in records))} for lv in (1, 2)}}}}))


def pipeline(tmp_path, extra=()):
    steps = json.dumps([{"name": "eval", "stage": "eval"}])
    return load_config(PipelineConfig, None, [
        f"run_dir={tmp_path}", f"steps={steps}", "summary.key=benchmarks.embedded.pass@1",
        "summary.rows={SFT: '${eval.dir}/SFT/summary.json', GRPO: '${eval.dir}/GRPO/summary.json'}",
        "summary.paired=[SFT, GRPO]", *extra])


def test_report_and_readme_come_from_the_runs_files(tmp_path):
    write_run(tmp_path, {"SFT": (A, 0.25), "GRPO": (B, 0.8)})
    (tmp_path / RUN_INFO).write_text(json.dumps({
        "commit": "abc1234", "started": "2026-12-04 10:00 UTC", "wall_s": 1070.0,
        "machine": {"cpu": "AMD EPYC", "cores": 2, "avx512_bf16": True, "amx_bf16": False, "torch": "2.13.0+cpu"},
        "stages": {"sft": {"state": "SUCCEEDED", "seconds": 539.0}}}))
    profile = load_profile("local", [])
    cfg = pipeline(tmp_path, ["summary.practised=[2]"])
    [gain] = paired_gains(cfg, profile)
    assert gain["practised"]["diff"] == 0.5 and gain["practised"]["problems"] == 2  # p3, p4 (p5 unpaired)
    text = "\n".join(summary_markdown(cfg, profile, with_files=False))
    assert "Measured at commit `abc1234` on 2-core AMD EPYC (AVX-512 BF16, no AMX), torch 2.13.0+cpu" in text
    assert "| sft | SUCCEEDED | 0:08:59 |" in text and "0:17:50 in all" in text
    assert "| GRPO | 80.0% | 100.0% | 66.7% |\n" in text  # the rows' own files (p5 counts there)
    assert "| GRPO − SFT (points) | +50.0 ± 28.9 | +50.0 ± 50.0 | +50.0 ± 50.0 |\n" in text
    assert "On the levels RL practised (L2) together: +50.0 ± 50.0." in text
    assert str(tmp_path) not in text  # the README block names no local paths

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{README_BEGIN}\nold typed numbers\n{README_END}\nafter\n")
    splice_readme(str(readme), cfg, profile)
    spliced = readme.read_text()
    assert "old typed numbers" not in spliced and spliced.startswith("# x\n\nbefore\n" + README_BEGIN)
    assert spliced.endswith(README_END + "\nafter\n") and "+50.0 ± 28.9" in spliced
    splice_readme(str(readme), cfg, profile)
    assert readme.read_text() == spliced  # idempotent

    readme.write_text("no markers\n")
    with pytest.raises(ConfigError, match="needs one"):
        splice_readme(str(readme), cfg, profile)
    with pytest.raises(ConfigError, match="'DPO' is not a row"):
        paired_gains(pipeline(tmp_path, ["summary.paired=[SFT, DPO]"]), profile)

    # several rows against one baseline: a row per model, each paired with the baseline
    write_run(tmp_path / "more", {"SFT": (A, 0.25), "GRPO": (B, 0.8), "again": (A, 0.25)})
    cfg = load_config(PipelineConfig, None, [
        f"run_dir={tmp_path / 'more'}", f"steps={json.dumps([{'name': 'eval', 'stage': 'eval'}])}",
        "summary.key=benchmarks.embedded.pass@1", "summary.practised=[2]", "summary.paired=[SFT, GRPO, again]",
        "summary.rows={SFT: '${eval.dir}/SFT/summary.json', GRPO: '${eval.dir}/GRPO/summary.json', "
        "again: '${eval.dir}/again/summary.json'}"])
    assert [(g["b"], g["all"]["diff"]) for g in paired_gains(cfg, profile)] == [("GRPO", 0.5), ("again", 0.0)]
    text = "\n".join(summary_markdown(cfg, profile, with_files=False))
    assert "| GRPO − SFT (points) | +50.0 ± 28.9 |" in text and "| again − SFT (points) | +0.0 ± 0.0 |" in text
    assert "together: GRPO +50.0 ± 50.0; again +0.0 ± 0.0." in text
    with pytest.raises(ConfigError, match="a baseline row and at least one other"):
        paired_gains(pipeline(tmp_path, ["summary.paired=[SFT]"]), profile)


def test_step_overrides_reach_the_named_step_and_unknown_steps_are_refused(tmp_path):
    from launchers.pipeline import plan

    steps = json.dumps([{"name": "gen", "stage": "task", "overrides": ["--n", "5"]}])
    profile = load_profile("local", [])
    cfg = load_config(PipelineConfig, None, [f"run_dir={tmp_path}", f"steps={steps}",
                                             "step_overrides={gen: ['--output', '${dir}/p.jsonl']}"])
    (task,) = plan(cfg, profile)
    assert task.nrr_args[-4:] == ["--n", "5", "--output", f"{tmp_path}/gen/p.jsonl"]
    cfg = load_config(PipelineConfig, None, [f"run_dir={tmp_path}", f"steps={steps}", "step_overrides={sft: [a=1]}"])
    with pytest.raises(ConfigError, match="step_overrides names unknown steps sft; steps: gen"):
        plan(cfg, profile)


def test_report_json_feeds_the_regression_goldens(tmp_path, capsys):
    """report.md's numbers land in report.json, and a `stage: pipeline` golden reads them by dotted path."""
    import yaml

    from launchers.pipeline import write_pipeline_report
    from recipes.cli import main

    run = tmp_path / "runs" / "demo"
    write_run(run, {"SFT": (A, 0.25), "GRPO": (B, 0.8)})
    cfg = pipeline(run, ["summary.practised=[2]"])
    write_pipeline_report(cfg, load_profile("local", []), str(run / "report.md"))
    values = json.loads((run / "report.json").read_text())
    assert values["rows"]["GRPO"] == {"file": str(run / "eval" / "GRPO" / "summary.json"), "all": 0.8,
                                      "levels": {"1": 1.0, "2": 2 / 3}}
    assert values["gains"]["GRPO"]["practised"]["diff"] == 0.5 and values["gains"]["GRPO"]["a"] == "SFT"
    assert math.isclose(values["gains"]["GRPO"]["all"]["se"], math.sqrt(1 / 3) / 2)

    goldens = tmp_path / "goldens.yaml"
    checks = [{"metric": "rows.GRPO.levels.2", "file": "report.json", "golden": 0.7, "atol": 0.05},
              {"metric": "gains.GRPO.practised.diff", "file": "report.json", "golden": 0.3, "atol": 0.1,
               "direction": "higher"},
              {"metric": "rows.SFT.all", "file": "report.json", "golden": 0.5, "atol": 0.1}]
    goldens.write_text(yaml.safe_dump({"configs": {"demo": {
        "stage": "pipeline", "config": "nemo_configs/pipeline/embedded.yaml", "checks": checks}}}))
    args = ["regress", "--goldens", str(goldens), "--runs", str(run.parent), "--compare-only", "--only", "demo"]
    assert main(args) == 1
    table = (run.parent / "regression.md").read_text()
    assert "| demo | rows.GRPO.levels.2 | last | 0.7 | 0.666667 | PASS |" in table
    assert "| demo | gains.GRPO.practised.diff | last | 0.3 | 0.5 | PASS |" in table  # higher: a larger gain passes
    assert "| demo | rows.SFT.all | last | 0.5 | 0.25 | FAIL: off by -0.25 (tolerance 0.1, both) |" in table
    (run / "report.json").unlink()
    assert main(args) == 1 and "FAIL: not logged" in (run.parent / "regression.md").read_text()
    capsys.readouterr()
