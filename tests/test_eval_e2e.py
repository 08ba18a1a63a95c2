"""End to end on CPU: a tiny random-init Qwen2 evaluated on a MATH-500 slice and the embedded task,
resumed after an interruption, graded from the CLI, and its HTML report rendered in headless Chromium."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recipes import task
from recipes.cli import main as nrr
from recipes.evaluation import evaluate_model, run_eval
from recipes.evaluation.config import BenchmarkConfig, EvalConfig, GenerationConfig
from recipes.grader import grade_response

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
MAX_TOKENS = 24


def _config(model, out_dir, thinking=True, run_name=None) -> EvalConfig:
    return EvalConfig(
        model=str(model),
        benchmarks=[BenchmarkConfig(name="math500", limit=3),
                    BenchmarkConfig(name="embedded", levels=[1, 2], n_per_level=2)],
        generation=GenerationConfig(backend="hf", k=2, temperature=0.8, max_tokens=MAX_TOKENS, batch_size=4,
                                    thinking=thinking),
        output_dir=str(out_dir),
        run_name=run_name,
        progress=False,
    )


@pytest.fixture(scope="module")
def hf_runs(tiny_model, tmp_path_factory):
    """Two runs of the same model: thinking and no-thinking mode."""
    base = tmp_path_factory.mktemp("eval-runs")
    think = _config(tiny_model, base / "think", thinking=True, run_name="think")
    no_think = _config(tiny_model, base / "no_think", thinking=False, run_name="no-think")
    return {"think": (think, run_eval(think)), "no_think": (no_think, run_eval(no_think))}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hf_backend_end_to_end(hf_runs):
    cfg, summary = hf_runs["think"]
    out = Path(cfg.output_dir)
    assert set(summary["benchmarks"]) == {"math500", "embedded"}
    math = _lines(out / "math500.jsonl")
    emb = _lines(out / "embedded.jsonl")
    assert len(math) == 3 * 2 and len(emb) == 4 * 2
    expected_pairs = {(p.id, i) for p in task.heldout_problems([1, 2], 2) for i in (0, 1)}
    assert {(r["id"], r["sample_idx"]) for r in emb} == expected_pairs
    for r in math + emb:
        assert r["is_correct"] == grade_response(r["generation"], r["expected_answer"]).correct
        assert 1 <= r["num_generated_tokens"] <= MAX_TOKENS
        assert r["thinking_tokens"] + r["answer_tokens"] == r["num_generated_tokens"]
        assert r["truncated"] == (r["finish_reason"] == "length")
    assert math[0]["expected_answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    m = summary["benchmarks"]["embedded"]
    assert m["problems"] == 4 and m["samples_per_problem"] == 2 and set(m["pass@k"]) == {"1", "2"}
    assert set(m["by_level"]) == {"1", "2"}
    assert 0.0 <= m["pass@1"] <= m["pass@k"]["2"] <= 1.0
    assert json.loads((out / "summary.json").read_text())["benchmarks"]["math500"]["problems"] == 3
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 3
    # no-think mode: the prompt closes an empty think block, so only a `</think>` the model itself writes
    # (a random model samples any token) starts a thinking count
    _, no_think = hf_runs["no_think"]
    rows = _lines(Path(hf_runs["no_think"][0].output_dir) / "embedded.jsonl")
    assert no_think["thinking"] is False
    own = [r for r in rows if "</think>" not in r["generation"]]
    assert own and all(r["thinking_tokens"] == 0 for r in own)


def test_rerun_resumes_and_skips_finished_samples(hf_runs, tmp_path):
    cfg, _ = hf_runs["think"]
    out = tmp_path / "resume"
    shutil.copytree(cfg.output_dir, out)
    path = out / "embedded.jsonl"
    before = _lines(path)
    # an interrupted run: the last three samples missing, the last line torn
    path.write_text("".join(json.dumps(r) + "\n" for r in before[:-3]) + '{"id": "arith-L2-')
    summary = run_eval(_config(cfg.model, out))
    after = _lines(path)  # every line parses: the torn one was cut before appending
    pairs = lambda rows: {(r["id"], r["sample_idx"]) for r in rows}  # noqa: E731
    assert len(after) == 8 and pairs(after) == pairs(before)
    assert after[:5] == before[:5]  # finished samples are kept, not regenerated
    assert summary["benchmarks"]["embedded"]["samples"] == 8
    # everything finished: a rerun generates nothing, so it does not even need the model
    again = run_eval(_config("/nonexistent/model", out))
    assert again["benchmarks"]["embedded"] == summary["benchmarks"]["embedded"]


def test_evaluate_model_api_accuracy_per_level(tiny_model, tmp_path):
    a = evaluate_model(tiny_model, benchmark="embedded", levels=[1, 2, 3], n_per_level=2, k=1, temperature=0,
                       backend="hf", out_dir=tmp_path / "a", max_tokens=12)
    b = evaluate_model(tiny_model, benchmark="embedded", levels=[1, 2, 3], n_per_level=2, k=1, temperature=0,
                       backend="hf", out_dir=tmp_path / "b", max_tokens=12)
    assert set(a["accuracy_by_level"]) == {"1", "2", "3"} and 0.0 <= a["accuracy"] <= 1.0
    assert a["problems"] == 6
    gen = lambda d: [r["generation"] for r in _lines(Path(d) / "embedded.jsonl")]  # noqa: E731
    assert gen(a["output_dir"]) == gen(b["output_dir"])  # greedy decoding is deterministic


def test_grade_cli_adds_predictions(tmp_path):
    problems = task.heldout_problems([1, 2, 3], 3)
    rows = [{"q": p.question, "resp": task.assistant_response(p), "gold": p.answer} for p in problems]
    rows += [{"q": p.question, "resp": task.assistant_response(p).replace(p.answer + "}", p.answer + "1}"),
              "gold": p.answer} for p in problems]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", "grade", "--input", str(src), "--response-field", "resp", "--reference-field", "gold"]
    assert nrr(args + ["--output", str(dst)]) == 0
    graded = _lines(dst)
    assert [g["is_correct"] for g in graded] == [True] * 9 + [False] * 9
    assert [g["predicted_answer"] for g in graded[:9]] == [p.answer for p in problems]
    assert all(g["q"] == r["q"] for g, r in zip(graded, rows))  # the other fields are kept
    bad = [*args[:-1], "nope", "--output", str(dst)]
    assert nrr(bad) == 2  # a missing field is reported with its line


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("this test renders the HTML report in headless Chromium, which is not installed, and this user "
                    "cannot install it (needs root and apt-get): `sudo apt-get install -y chromium` (Debian/Ubuntu) "
                    "or put a chromium / google-chrome binary on PATH, then re-run")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if res.returncode != 0 or not shutil.which("chromium"):
        pytest.fail(f"chromium is missing and `apt-get install -y chromium` failed: {res.stderr[-300:]}")
    return shutil.which("chromium")


def test_compare_report_renders_in_headless_chromium(hf_runs, tmp_path):
    runs = [hf_runs["think"][0].output_dir, hf_runs["no_think"][0].output_dir]
    report = tmp_path / "report.html"
    assert nrr(["eval", "compare", *runs, "--output", str(report)]) == 0
    text = report.read_text()
    assert "think" in text and "no-think" in text and text.count("data:image/png;base64,") >= 4
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "eval_report.png"
    shot.unlink(missing_ok=True)
    res = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
         "--window-size=1400,2400", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a rendered page, not a blank one


# 40 problems x 8 samples in one batch overflow one scheduler step (the case where seeded CPU sampling used to crash)
VLLM_BENCH = [BenchmarkConfig(name="embedded", levels=[1, 2], n_per_level=20)]


def _vllm_generation(batch_size: int) -> GenerationConfig:
    return GenerationConfig(backend="vllm", k=8, temperature=0.8, max_tokens=MAX_TOKENS, batch_size=batch_size)


@pytest.fixture(scope="module")
def vllm_alone(tiny_model, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny model alone on vLLM (offline LLM in its worker process, float32, eager on CPU), 40 prompts a batch:
    its output folder and summary."""
    out = tmp_path_factory.mktemp("vllm-alone")
    return out, run_eval(EvalConfig(model=str(tiny_model), benchmarks=VLLM_BENCH, generation=_vllm_generation(40),
                                    output_dir=str(out), progress=False, report=False))


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_backend_end_to_end(vllm_alone):
    """The same pipeline on vLLM, 40 problems x 8 samples in one batch (test_models_share_one_vllm_engine_and_
    match_separate_runs checks that each problem's samples depend on its prompt and the seed only, not on the
    batching)."""
    out, summary = vllm_alone
    result = summary["benchmarks"]["embedded"]
    rows = _lines(out / "embedded.jsonl")
    assert len(rows) == 40 * 8 and result["samples_per_problem"] == 8
    assert set(result["by_level"]) == {"1", "2"}
    for r in rows:
        assert 1 <= r["num_generated_tokens"] <= MAX_TOKENS
        assert r["finish_reason"] in ("stop", "length")
        assert r["is_correct"] == grade_response(r["generation"], r["expected_answer"]).correct
    assert len({r["generation"] for r in rows}) > 40  # sampled, not one repeated string per problem


@pytest.fixture(scope="module")
def seeded_inits(tmp_path_factory) -> dict[int, Path]:
    """`model=<config.json>` resolved with init seeds 0 and 1 (in one process of its own: exporting a Megatron
    checkpoint starts a process group, which must not start in pytest's)."""
    base = tmp_path_factory.mktemp("seeded-inits")
    config = ROOT / "recipes/assets/models/tiny-qwen2/config.json"
    code = ("import sys; from pathlib import Path; from recipes.evaluation.runner import resolve_model; "
            "[print(resolve_model(sys.argv[1], Path(sys.argv[2]) / f'seed{s}', init_seed=s)) for s in (0, 1)]")
    proc = subprocess.run([sys.executable, "-c", code, str(config), str(base)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(enumerate(Path(line) for line in proc.stdout.strip().splitlines()[-2:]))


def test_config_json_model_is_the_seeded_random_init(tiny_model, seeded_inits):
    """`model=<config.json>` evaluates that architecture with random weights: the checkpoint `nrr convert init`
    writes for the same seed (the demo's base row), another seed another model."""
    for seed, folder in seeded_inits.items():
        assert folder.name == "hf_model" and folder.parent.name == f"seed{seed}"
        assert (folder / "tokenizer.json").exists()
    weights = {seed: (folder / "model.safetensors").read_bytes() for seed, folder in seeded_inits.items()}
    assert weights[0] == (tiny_model / "model.safetensors").read_bytes()
    assert weights[1] != weights[0]


@pytest.mark.vllm
@pytest.mark.slow
def test_models_share_one_vllm_engine_and_match_separate_runs(tiny_model, seeded_inits, vllm_alone, tmp_path,
                                                             monkeypatch):
    """`models: {other, tiny}` starts one engine on the other seed's weights and swaps the tiny model's in place:
    the tiny model's answers, 7 prompts a batch, equal its run alone at 40 a batch (no stale weights, no
    prefix-cache blocks computed by the other model, and each problem's samples depend on its prompt and the seed
    only, not on the batching), and differ from the other model's."""
    from recipes.evaluation import runner

    other = seeded_inits[1]  # the checkpoint `nrr convert init --seed 1` writes (test_config_json_model_is_...)
    # seeded sampling: random models answer greedily with the same blank line; their samples differ
    starts = []
    make_backend = runner.make_backend
    monkeypatch.setattr(runner, "make_backend", lambda cfg, d: starts.append(d) or make_backend(cfg, d))
    pair = run_eval(EvalConfig(models={"other": str(other), "tiny": str(tiny_model)}, benchmarks=VLLM_BENCH,
                               generation=_vllm_generation(7), output_dir=str(tmp_path / "pair"), progress=False,
                               report=False))
    assert len(starts) == 1 and list(pair["models"]) == ["other", "tiny"]
    alone_dir, alone = vllm_alone

    def answers(folder):
        return {(r["id"], r["sample_idx"]): r["generation"] for r in _lines(folder / "embedded.jsonl")}

    assert len(answers(alone_dir)) == 40 * 8
    assert answers(tmp_path / "pair" / "tiny") == answers(alone_dir)
    assert answers(tmp_path / "pair" / "other") != answers(alone_dir)
    assert pair["models"]["tiny"]["benchmarks"] == alone["benchmarks"]
    with pytest.raises(ValueError, match="not both"):
        run_eval(EvalConfig(model=str(other), models={"A": str(tiny_model)}, benchmarks=VLLM_BENCH,
                            generation=_vllm_generation(7)))
