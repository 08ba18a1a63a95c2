"""megatron-core engine: the same training losses at TP=1, TP=2 and PP=2; checkpoints reshard across layouts.

Each layout is a run of tests/megatron_scripts/parallel_train.py outside the pytest process (megatron's global state
and the CPU device layer stay out of it; the runs share their launch with the other megatron test modules'). All
layouts load the same HF weights, so the first 3 AdamW steps must agree to 1e-5; the TP=2 run saves a checkpoint
that the PP=2 and TP=1 runs load.
"""

from __future__ import annotations

import json

import pytest

TOL = 1e-5


# (nproc, worker script, argv): launched with the other megatron modules' runs (tests/megatron_scripts/run_many.py)
WORKER_RUNS = [
    (2, "parallel_train", ["--tp", "2", "--hf", "{work}/hf_init", "--out", "{work}/tp2.json",
                           "--save", "{work}/ckpt_tp2"]),
    (2, "parallel_train", ["--pp", "2", "--hf", "{work}/hf_init", "--out", "{work}/pp2.json",
                           "--load", "{work}/ckpt_tp2"]),
    (1, "parallel_train", ["--hf", "{work}/hf_init", "--out", "{work}/tp1.json", "--load", "{work}/ckpt_tp2"]),
]


@pytest.fixture(scope="module")
def layouts(megatron_workers) -> dict[str, dict]:
    work = megatron_workers[__name__]
    return {name: json.loads((work / f"{name}.json").read_text()) for name in ("tp1", "tp2", "pp2")}


@pytest.mark.slow
def test_first_step_loss_matches_transformers(layouts):
    tp1 = layouts["tp1"]
    assert tp1["losses"][0] == pytest.approx(tp1["hf_reference_loss"], abs=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_training_losses_equal_across_layouts(layouts, layout):
    ref, got = layouts["tp1"]["losses"], layouts[layout]["losses"]
    assert len(got) == 3
    assert ref[2] < ref[0] + 0.5  # the steps ran with a real optimizer (loss moves, stays finite)
    assert ref[0] != ref[1] != ref[2]
    for a, b in zip(ref, got):
        assert b == pytest.approx(a, abs=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_hf_export_gathers_tp_and_pp_exactly(layouts, layout):
    assert layouts[layout]["hf_export_exact"] is True


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_logprobs_and_custom_loss_across_layouts(layouts, layout):
    ref, got = layouts["tp1"], layouts[layout]
    assert got["custom_loss"] == pytest.approx(ref["losses"][0], abs=TOL)
    flat_ref = [x for row in ref["logprobs"] for x in row]
    flat_got = [x for row in got["logprobs"] for x in row]
    assert len(flat_got) == 2 * 31
    assert max(abs(a - b) for a, b in zip(flat_ref, flat_got)) < TOL
    assert all(x < 0 for x in flat_got)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "pp2"])
def test_checkpoint_saved_at_tp2_loads_in_other_layouts(layouts, layout):
    saved = layouts["tp2"]
    got = layouts[layout]
    assert got["loaded_step"] == 3 and got["loaded_extra"] == {"layout": [2, 1]}
    assert got["eval_loss_loaded"] == pytest.approx(saved["eval_loss_trained"], abs=TOL)


@pytest.mark.slow
def test_packed_sequences_give_the_unpacked_loss_and_grads(layouts):
    packed = layouts["tp1"]["packed"]
    ref = packed["unpacked"]
    assert ref["num_tokens"] == 32
    for name in ("packed", "packed_cu"):
        assert packed[name]["num_tokens"] == 32
        assert packed[name]["loss"] == pytest.approx(ref["loss"], abs=TOL)
        assert packed[name]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert abs(packed["packed_no_mask"]["loss"] - ref["loss"]) > 1e-3  # the mask is what makes them equal
