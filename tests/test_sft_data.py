"""SFT data path: assistant-only loss mask, think/no-think mixing, bad records, packing."""

import json

import numpy as np
import pytest

from recipes import tokenizer
from recipes.data import packing
from recipes.data import sft_dataset as sd

CONTENT = "<think>\n1+2=3\n</think>\n\n\\boxed{3}"
MESSAGES = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": CONTENT}]
tok = tokenizer.load()  # the embedded students' byte-level tokenizer


def test_loss_mask_covers_exactly_the_assistant_tokens():
    ids, mask = sd.tokenize_conversation(MESSAGES, tok)
    # by hand: <|im_start|> "user\n1+2" <|im_end|> "\n" <|im_start|> "assistant\n"  = 1+8+1+1+1+10 = 22 tokens,
    # then <think> "\n1+2=3\n" </think> "\n\n" "\boxed{3}" <|im_end|> = 1+7+1+2+9+1 = 21 tokens, then "\n"
    assert len(ids) == 22 + 21 + 1
    assert mask.tolist() == [0] * 22 + [1] * 21 + [0]
    assert tok.decode(ids[22:43]) == CONTENT + "<|im_end|>"
    assert ids[42] == tok.stop_ids[0]
    ex = sd.to_example(MESSAGES, seq_length=64, vocab_size=384, where="x:1", tokenizer=tok)
    # shifted: labels[i] = ids[i + 1]; the loss covers the labels that are assistant tokens
    assert ex.labels.tolist() == ids[1:].tolist() and ex.input_ids.tolist() == ids[:-1].tolist()
    assert np.flatnonzero(ex.loss_mask).tolist() == list(range(21, 42))


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_think_ratio_mixes_think_and_no_think(tmp_path):
    corpus = sd.write_records(sd.task_records([1, 2], 100, seed=3), tmp_path / "c.jsonl")
    _, all_think = sd.load_examples(corpus, sd.DataConfig(think_ratio=1.0), 384, tok)
    assert (all_think.think, all_think.no_think) == (200, 0)
    ex, none = sd.load_examples(corpus, sd.DataConfig(think_ratio=0.0), 384, tok)
    assert (none.think, none.no_think) == (0, 200)
    # no-think as the template asks for it at inference: the empty think block closes the prompt, the answer is
    # what the model writes (and is trained on)
    text = tok.decode([t for t, m in zip(ex[0].labels, ex[0].loss_mask) if m])
    assert text.startswith("\\boxed{") and text.endswith("}<|im_end|>")
    first = int(np.flatnonzero(ex[0].loss_mask)[0])
    assert tok.decode(ex[0].labels[:first]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    _, half = sd.load_examples(corpus, sd.DataConfig(think_ratio=0.5), 384, tok)
    assert 70 <= half.think <= 130 and half.think + half.no_think == 200
    _, again = sd.load_examples(corpus, sd.DataConfig(think_ratio=0.5), 384, tok)
    assert again.think == half.think  # the per-record choice is stable


def test_bad_records_error_with_file_and_line_or_are_counted(tmp_path):
    good = {"id": "a", "messages": MESSAGES}
    long = {"id": "b", "messages": [MESSAGES[0], {"role": "assistant", "content": "9" * 200}]}
    path = _write(tmp_path / "bad.jsonl", [good, {"id": "no-messages", "text": "hi"}, good, long, "{not json"])
    with pytest.raises(sd.DataError, match=r"bad\.jsonl:2: record has no 'messages'"):
        sd.load_examples(path, sd.DataConfig(seq_length=64), 384, tok)
    with pytest.raises(sd.DataError, match=r"b2\.jsonl:2: record has \d+ tokens, longer than seq_length=64"):
        sd.load_examples(_write(tmp_path / "b2.jsonl", [good, long]), sd.DataConfig(seq_length=64), 384, tok)
    ex, stats = sd.load_examples(path, sd.DataConfig(seq_length=64, on_bad_record="skip"), 384, tok)
    assert len(ex) == 2 and stats.skipped == {"messages": 1, "too_long": 1, "json": 1}
    with pytest.raises(sd.DataError, match="tokenizer/model mismatch"):
        sd.load_examples(_write(tmp_path / "ok.jsonl", [good]), sd.DataConfig(), 200, tok)


def test_parquet_reads_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = sd.task_records([1, 2, 3], 10, seed=0)
    jsonl = sd.write_records(records, tmp_path / "c.jsonl")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    a, _ = sd.load_examples(jsonl, sd.DataConfig(), 384, tok)
    b, _ = sd.load_examples(tmp_path / "c.parquet", sd.DataConfig(), 384, tok)
    assert [e.input_ids.tolist() for e in a] == [e.input_ids.tolist() for e in b]
    assert b[4].source.endswith("c.parquet:row 5")


def test_first_fit_decreasing_by_hand():
    # sizes 5,4,3,3,2,2,1 into bins of 8: 5->b0, 4->b1, 3->b0 (full), 3->b1, 2->b2, 2->b2, 1->b1
    bins = packing.first_fit_decreasing([2, 5, 1, 3, 4, 2, 3], 8)
    sizes = [sorted(([2, 5, 1, 3, 4, 2, 3][i] for i in b), reverse=True) for b in bins]
    assert sizes == [[5, 3], [4, 3, 1], [2, 2]]
    with pytest.raises(ValueError):
        packing.first_fit_decreasing([9], 8)


def test_packed_rows_restart_positions_and_block_attention():
    ex = [sd.to_example([{"role": "user", "content": q}, {"role": "assistant", "content": "\\boxed{1}"}], 96, 384, "", tok)
          for q in ("1", "22", "333")]
    rows = packing.pack(ex, 96, tok.pad_id)
    assert len(rows) == 1 and sorted(rows[0].doc_lengths) == sorted(len(e) for e in ex)
    batch = packing.collate(rows)
    n0, n1 = rows[0].doc_lengths[:2]
    pos = batch["position_ids"][0].tolist()
    assert pos[:n0] == list(range(n0)) and pos[n0:n0 + n1] == list(range(n1))
    mask = batch["attention_mask"][0, 0]  # True = masked
    assert not mask[n0 + 1, n0] and mask[n0 + 1, n0 - 1] and mask[0, 1]  # own doc, other doc, future
    assert batch["cu_seqlens"].tolist() == [0, n0, n0 + n1, sum(rows[0].doc_lengths), 96]
    assert batch["loss_mask"].sum().item() == sum(e.loss_mask.sum() for e in ex)
    padded = packing.collate(packing.pad(ex, 96, tok.pad_id))
    assert padded["attention_mask"] is None and "cu_seqlens" not in padded
    assert padded["loss_mask"].sum().item() == batch["loss_mask"].sum().item()


def test_row_sampler_is_a_pure_function_of_the_step():
    rows = list(range(10))
    a = sd.RowSampler(rows, 4, seed=7)
    b = sd.RowSampler(rows, 4, seed=7)
    first_epochs = [a.global_batch(k) for k in range(5)]  # 20 rows = two epochs
    assert b.global_batch(3) == first_epochs[3]
    assert sorted(sum(first_epochs[:2], []) + first_epochs[2][:2]) == rows


def test_task_corpus_spells_out_a_share_of_its_traces():
    from recipes import task

    records = sd.task_records([2, 3], 400, seed=1, spell_out_rate=0.5)
    by_id = {p.id: p for p in task.train_problems([2, 3], 400, seed=1)}
    spelled = hard = 0
    for r in records:
        p = by_id[r["id"]]
        text = r["messages"][1]["content"]
        if task.cot_text(p, spell_out=True) == task.cot_text(p):
            assert text == task.assistant_response(p)  # nothing to spell out
            continue
        hard += 1
        spelled += text == task.assistant_response(p, spell_out=True)
        assert text in (task.assistant_response(p), task.assistant_response(p, spell_out=True))
    assert hard > 200 and abs(spelled / hard - 0.5) < 0.08
    assert sd.task_records([2, 3], 400, seed=1, spell_out_rate=0.5) == records  # a function of the seed


def test_every_corpus_writer_writes_the_one_trace_record_and_sft_reads_them_all(tmp_path):
    from curator_pipelines.write import corpus_record
    from recipes import task
    from recipes.rl.rejection_sampling import to_record

    p = task.train_problems([2], 1, seed=4)[0]
    response = task.assistant_response(p)
    from_task = sd.task_records([2], 1, seed=4)[0]
    from_rejection = to_record(p.to_dict(), response, 0, {"policy": "ckpt"})
    from_curation = corpus_record({"record_id": "c-0", "problem": p.question, "response": response, "answer_part": "",
                                   "problem_id": p.id, "reference": p.answer, "source": "embedded", "teacher": "t",
                                   "sample_index": 0, "predicted": p.answer, "f_length_score": 40.0}, [])
    core = ["id", "messages", "enable_thinking", "problem_id", "reference", "source", "teacher"]
    for rec in (from_task, from_rejection, from_curation):
        assert list(rec)[:len(core)] == core, rec
        assert rec["messages"] == [{"role": "user", "content": p.question}, {"role": "assistant", "content": response}]
        assert rec["problem_id"] == p.id and rec["reference"] == p.answer and rec["enable_thinking"] is True
    path = sd.write_records([from_task, from_rejection, from_curation], tmp_path / "mixed.jsonl")
    examples, stats = sd.load_examples(path, sd.DataConfig(), 384, tok)
    assert stats.examples == 3 and len({tuple(e.input_ids.tolist()) for e in examples}) == 1


def test_data_schema_and_fields_reach_the_reader(tmp_path):
    """data.fields maps a dataset's own columns onto a schema's names; data.schema names the schema; without them
    the same file matches no schema."""
    rows = [{"q": "1+2", "out": "<think>\n1+2=3\n</think>\n\n\\boxed{3}"}]
    path = _write(tmp_path / "own.jsonl", rows)
    cfg = sd.DataConfig(schema="pair", fields={"problem": "q", "response": "out"})
    examples, stats = sd.load_examples(path, cfg, 384, tok)
    ids, mask = sd.tokenize_conversation(MESSAGES, tok)
    assert stats.examples == 1 and examples[0].input_ids.tolist() == ids[:-1].tolist()
    with pytest.raises(sd.DataError, match="match no known schema"):
        sd.load_examples(path, sd.DataConfig(), 384, tok)
