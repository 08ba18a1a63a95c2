
import pytest

from recipes import response_format as ct
from recipes import task
from recipes import tokenizer as tk


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5, 6])
def test_steps_reduce_one_operation_each_and_agree_with_eval(level):
    for p in task.generate(level, 200, seed=3):
        assert len(p.steps) == level
        assert int(p.answer) == task.evaluate(p.question)
        for step in p.steps[:-1]:
            assert task.evaluate(step) == int(p.answer)


def test_heldout_is_fixed_and_disjoint():
    a = task.heldout_problems([1, 2, 3], 50)
    b = task.heldout_problems([1, 2, 3], 50)
    assert [p.id for p in a] == [p.id for p in b]
    train = {p.question for p in task.train_problems([1, 2, 3], 2000, seed=7)}
    assert not train & {p.question for p in a}


def test_hand_checked_reduction():
    assert task.solve_steps("(3+4)*5-2") == ["7*5-2", "35-2", "33"]
    assert task.solve_steps("2+3*4") == ["2+12", "14"]
    assert task.solve_steps("((1+2)*3)") == ["(3*3)", "9"]


def test_spelled_out_steps_by_hand():
    assert task.solve_steps("83-47", spell_out=True) == ["83-40-7", "43-7", "36"]
    assert task.solve_steps("47*3", spell_out=True) == ["40*3+7*3", "120+7*3", "120+21", "141"]
    assert task.solve_steps("5+3*47", spell_out=True) == ["5+(3*40+3*7)", "5+(120+3*7)", "5+(120+21)", "5+141", "146"]
    assert task.solve_steps("9+30-20", spell_out=True) == task.solve_steps("9+30-20")  # nothing hard: unchanged


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_spelled_out_steps_agree_with_eval_and_follow_reduce_once(level):
    changed = 0
    for p in task.generate(level, 300, seed=4):
        steps = task.solve_steps(p.question, spell_out=True)
        assert steps[-1] == p.answer
        for step in steps[:-1]:
            assert task.evaluate(step) == int(p.answer)
        prev = p.question
        for step in steps:
            assert task.reduce_once(prev, spell_out=True) == step
            prev = step
        changed += steps != list(p.steps)
        if steps != list(p.steps):
            assert len(steps) > len(p.steps)
    assert 0.1 < changed / 300 < 0.8  # hard operations are common but not everywhere


def test_train_problems_with_one_count_per_level():
    problems = task.train_problems([1, 4], [30, 5], seed=2)
    assert sorted(p.level for p in problems) == [1] * 30 + [4] * 5
    with pytest.raises(ValueError, match="2 levels"):
        task.train_problems([1, 4], [30], seed=2)


def test_embedded_template_renders_as_transformers_and_tokenizer_round_trips():
    transformers = pytest.importorskip("transformers")
    folder = tk.EMBEDDED_MODEL
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    tok = tk.load()
    p = task.generate(3, 1)[0]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p.question},
            {"role": "assistant", "content": task.assistant_response(p)}]
    for gen, think in [(False, True), (True, True), (True, False)]:
        m = msgs[:-1] if gen else msgs
        ours = tok.render(m, add_generation_prompt=gen, enable_thinking=think)
        assert hf.apply_chat_template(m, tokenize=False, add_generation_prompt=gen, enable_thinking=think) == ours
        assert hf(ours, add_special_tokens=False)["input_ids"] == tok.encode(ours)
    assert tok.render(msgs[1:2], add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert (hf.eos_token_id,) == tok.stop_ids
    text = "héllo 数学 \\frac{1}{2} <think>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<think>") == [hf.convert_tokens_to_ids("<think>")]
    assert len(tok.encode("héllo")) == len("héllo".encode())  # one token per byte


def test_split_response():
    assert ct.split_response("<think>\na;b\n</think>\n\n\\boxed{3}") == ("a;b", "\\boxed{3}", True)
    assert ct.split_response("a;b\n</think>\n\nx") == ("a;b", "x", True)
    assert ct.split_response("<think>\nloop loop") == ("loop loop", "", False)
    assert ct.split_response("\\boxed{3}") == (None, "\\boxed{3}", False)
    assert ct.format_response(None, "\\boxed{1}") == "<think>\n\n</think>\n\n\\boxed{1}"
