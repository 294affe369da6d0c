"""``llmdistill onpolicy``: the loss against a dense reference, the teacher's grades against a plain
forward (and a pool of servers against what they were given), the rollout engine against the trainer
after a weight sync, an exact resume, and GKD's mix of offline built batches."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import (  # tests/ is on sys.path (pytest's rootdir conftest)
    forbid,
    run_cli,
    with_another_tokenizer,
)
from safetensors.torch import load_file

import llmdistill.onpolicy as op
from llmdistill.collate import DistillCollator
from llmdistill.compute import checkpoint_compute
from llmdistill.config.base import ConfigError, UserError
from llmdistill.config.onpolicy import OnPolicyConfig
from llmdistill.formats import read_built
from llmdistill.losses import TEACHER_PROB_FLOOR
from llmdistill.onpolicy import (
    Cursor,
    PromptStream,
    PromptTable,
    epoch_order,
    load_prompts,
    load_student,
    offline_steps,
    onpolicy_loss,
    pack,
    score,
)
from llmdistill.tinyworld.kd_data import write_tiny_built
from llmdistill.tinyworld.task import generate_problems, to_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("op") / "prompts.jsonl", to_records(generate_problems(40, seed=7)))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_tokenizer, tiny_random_teacher_dir) -> Path:
    """Built shards (``llmdistill build``) of 48 tiny-world traces with the random teacher's top-8."""
    return write_tiny_built(tmp_path_factory.mktemp("op_built"), tiny_tokenizer, generate_problems(48, seed=3),
                            tiny_random_teacher_dir, k=8, max_length=128)


def config(prompts: Path, student: Path, teacher: Path, out: Path, **overrides) -> OnPolicyConfig:
    values = dict(dataset=str(prompts), student_model=str(student), teacher_model=str(teacher), output_dir=str(out),
                  prompts_per_step=4, max_new_tokens=24, max_steps=3, learning_rate=1e-3, logprobs_top_k=8,
                  logging_steps=1, max_model_len=256, seed=0)
    return OnPolicyConfig(**{**values, **overrides})


# ---- pure pieces -----------------------------------------------------------------------------


@pytest.mark.unit
def test_the_prompt_stream_is_a_seeded_order_that_a_resume_finds_again():
    table = PromptTable.from_rows([{"i": i} for i in range(10)])
    stream = PromptStream(table, 3, Cursor(4))
    steps = [stream.batch(s) for s in range(5)]  # 20 positions: two epochs
    assert sorted(steps[0] + steps[1] + steps[2][:2]) == list(range(10))  # each prompt once per epoch
    assert sorted(steps[2][2:] + steps[3] + steps[4]) == list(range(10))
    assert steps == [PromptStream(PromptTable.from_rows([{"i": i} for i in range(10)]), 3, Cursor(4)).batch(s)
                     for s in range(5)]
    assert steps[0] != PromptStream(table, 4, Cursor(4)).batch(0)
    assert table.rows(steps[0]) == [{"i": i} for i in steps[0]]


@pytest.mark.unit
def test_a_step_takes_its_prompts_from_their_chunks_not_the_joined_column():
    """A column of 2.4e9 values in all (list<null>: no memory), as many chunks of a big prompt file
    are: a step's rows come from the chunks that hold them, in the order asked. Taking from the
    whole table joins the chunks first (the whole column's bytes every step), which overflows
    Arrow's 32-bit offsets here."""
    n = 800_000_000
    chunk = pa.ListArray.from_arrays(pa.array([0, n - 7, n], pa.int32()), pa.nulls(n))
    table = pa.table({"prompt": pa.chunked_array([chunk] * 3),
                      "id": pa.chunked_array([pa.array([0, 1]), pa.array([2, 3]), pa.array([4, 5])])})
    with pytest.raises(pa.ArrowInvalid, match="offset overflow"):
        table.take(pa.array([1]))
    assert PromptTable(table).rows([5, 1, 3, 5]) == [{"prompt": [None] * 7, "id": i} for i in (5, 1, 3, 5)]
    with pytest.raises(IndexError, match="out of range 0..5"):
        PromptTable(table).rows([6])
    assert PromptTable(pa.table({"id": []})).rows([]) == []


@pytest.mark.unit
def test_the_seeded_order_is_drawn_once_per_epoch_and_stays_the_checkpointed_one():
    """A step reads its batch from the epoch's permutation kept in memory, not from a new draw of all
    rows (a tenth of a second a step for millions of rows); the order is the one older checkpoints
    resume into: ``default_rng([*key, epoch]).permutation(n)``."""
    epoch_order.cache_clear()
    stream = PromptStream(PromptTable(pa.table({"i": np.arange(1000)})), 5, Cursor(16))
    read = [i for s in range(100) for i in stream.batch(s)]  # 1,600 positions: all of epoch 0, 600 of epoch 1
    assert epoch_order.cache_info().misses == 2
    expected = [np.random.default_rng([5, e]).permutation(1000) for e in (0, 1)]
    assert read == expected[0].tolist() + expected[1][:600].tolist()
    with pytest.raises(ValueError):
        epoch_order(1000, (5,), 0)[0] = 1  # callers share the cached order: it is read-only


@pytest.mark.unit
def test_the_prompt_order_the_offline_choice_and_the_row_order_are_separate_streams():
    """No two streams share a generator: NumPy drops a key's trailing zeros, so [seed, 1] (the
    prompts' second epoch) and [seed, 1, 0] are one generator; the offline keys must not be either."""
    def first_words(key):
        return np.random.default_rng(key).bit_generator.random_raw(4).tolist()

    for seed in (0, 3):
        prompts = [first_words([seed, epoch]) for epoch in range(4)]
        choice = first_words([seed, *op.OFFLINE_CHOICE_KEY])
        rows = [first_words([seed, *op.OFFLINE_ROWS_KEY, epoch]) for epoch in range(4)]
        streams = prompts + [choice] + rows
        assert len({tuple(words) for words in streams}) == len(streams)
    assert first_words([3, 1]) == first_words([3, 1, 0])  # why: trailing zeros drop out


@pytest.mark.unit
def test_only_the_steps_that_read_a_stream_move_it():
    """GKD's lambda: the on-policy steps read prompts, the offline steps read rows, each stream batch after batch."""
    offline = np.array([False, True, True, False, True, False])
    prompts, rows = Cursor(3, ~offline), Cursor(2, offline)
    assert [prompts.position(s) for s in range(7)] == [0, 3, 3, 3, 6, 6, 9]
    assert [rows.position(s) for s in range(7)] == [0, 0, 2, 4, 4, 6, 6]
    assert [Cursor(3).position(s) for s in range(3)] == [0, 3, 6]
    assert prompts.resumed(4, 100).position(6) == 103 and prompts.resumed(4, 100).position(4) == 100


@pytest.mark.unit
def test_a_resume_with_another_batch_size_goes_on_where_the_checkpoint_stopped():
    """Checkpoint-2 of a run of 4 prompts a step, resumed with 2 (and the offline rows with another size):
    the resumed steps read the rest of the epoch, no prompt twice, none skipped, and say what changed."""
    import logging

    table = PromptTable.from_rows([{"i": i} for i in range(12)])
    before = PromptStream(table, 0, Cursor(4))
    seen = before.batch(0) + before.batch(1)
    rows = types.SimpleNamespace(cursor=Cursor(3, np.array([True, True, False, True])))
    state = {"step": 2, "streams": op.stream_places(2, before, rows)}
    assert state["streams"] == {"prompts_per_step": 4, "prompt_position": 8,
                                "offline_rows_per_step": 3, "offline_position": 6}
    after = PromptStream(table, 0, Cursor(2))
    rows_after = types.SimpleNamespace(cursor=Cursor(5, rows.cursor.reads))
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    op.logger.addHandler(handler)
    level = op.logger.level
    op.logger.setLevel(logging.INFO)
    try:
        op.resume_streams(Path("run/checkpoint-2"), state, after, rows_after)
    finally:
        op.logger.removeHandler(handler)
        op.logger.setLevel(level)
    seen += after.batch(2) + after.batch(3)
    assert sorted(seen) == list(range(12))  # the epoch, each prompt once
    assert after.batch(4) == PromptStream(table, 0, Cursor(4)).batch(3)[:2]  # then the next epoch's first two
    assert rows_after.cursor.position(2) == 6 and rows_after.cursor.position(4) == 11  # step 2 reads no rows, step 3 five
    assert messages == ["run/checkpoint-2: prompts_per_step 4 -> 2, offline_rows_per_step 3 -> 5 changed on resume; "
                        "the streams go on from where it stopped (prompt_position 8, offline_position 6)"]

    # a checkpoint from before the positions were kept stopped at step x its prompts_per_step (every step counted)
    for old, position in (({"prompt_layout": {"prompts_per_step": 8}}, 16), ({}, 4)):
        stream = PromptStream(table, 0, Cursor(2, np.array([True, False, True, True])))
        op.resume_streams(Path("c"), {"step": 2, **old}, stream, None)
        assert stream.cursor.position(2) == position and stream.cursor.position(3) == position + 2


def _prompt_config(dataset, **overrides) -> OnPolicyConfig:
    return OnPolicyConfig(**{"dataset": str(dataset), "student_model": "org/student", "teacher_model": "org/teacher",
                             "output_dir": "unused", **overrides})


@pytest.mark.unit
def test_prompts_load_the_same_from_jsonl_json_parquet_and_a_hub_dataset(tmp_path, monkeypatch):
    import datasets
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "answer": i if i % 3 else None, "domain": "math" if i % 2 else "code", "extra": i}
            for i in range(7)]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "p.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    monkeypatch.setattr(op, "_CHUNK_ROWS", 2)  # several Arrow chunks, int then null answers promoted
    loaded = datasets.Dataset.from_list(rows)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: loaded)
    settings = {"teacher_model": "math=org/a,code=org/b", "teacher_column": "domain"}
    expected = [{"prompt": r["prompt"], "domain": r["domain"], "answer": r["answer"]} for r in rows]
    for source in (tmp_path / "p.jsonl", tmp_path / "p.json", tmp_path / "p.parquet", "org/prompts"):
        table = load_prompts(_prompt_config(source, **settings))
        assert len(table) == 7 and table.table.column_names == ["prompt", "domain", "answer"], source
        assert table.rows([6, 0, 3]) == [expected[6], expected[0], expected[3]], source


@pytest.mark.unit
def test_prompt_values_come_back_as_the_run_reads_them(tmp_path):
    """Teacher names are text whatever the column's type; answers of mixed types load as text; chat
    messages keep only their own keys (Arrow fills the keys of other messages with None)."""
    import pyarrow.parquet as pq

    routed = {"teacher_model": "0=org/a,1=org/b", "teacher_column": "src"}
    pq.write_table(pa.table({"prompt": ["a", "b"], "src": [0, 1]}), tmp_path / "n.parquet")
    (tmp_path / "n.jsonl").write_text('{"prompt": "a", "src": 0}\n{"prompt": "b", "src": 1}\n')
    for name in ("n.parquet", "n.jsonl"):
        assert load_prompts(_prompt_config(tmp_path / name, **routed)).rows([0, 1]) == [
            {"prompt": "a", "src": "0"}, {"prompt": "b", "src": "1"}], name
    messages = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
                [{"role": "user", "content": "2+2?", "tool_calls": [{"name": "calc"}]}]]
    (tmp_path / "m.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [{"prompt": messages[0], "answer": 72}, {"prompt": messages[1], "answer": "3/4"}]))
    assert load_prompts(_prompt_config(tmp_path / "m.jsonl")).rows([0, 1]) == [
        {"prompt": messages[0], "answer": "72"}, {"prompt": messages[1], "answer": "3/4"}]
    (tmp_path / "x.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": [{"role": "user", "content": "b"}]}\n')
    with pytest.raises(ConfigError, match=r"x\.jsonl line 3: column 'prompt' holds \[\{'role': 'user', 'content': "
                                          r"'b'\}\], which does not fit the string values of the rows before it"):
        load_prompts(_prompt_config(tmp_path / "x.jsonl"))


@pytest.mark.unit
def test_a_column_whose_type_changes_between_chunks_names_where(tmp_path, monkeypatch):
    """Rows read 2 at a time: lists of numbers in two chunks, then lists of text, fail naming the column
    and the line where it stopped fitting the rows before; a text column's nulls then text are promoted."""
    monkeypatch.setattr(op, "_CHUNK_ROWS", 2)
    lines = ['{"prompt": "a", "answer": null, "domain": [1]}', '{"prompt": "b", "answer": null, "domain": [2]}',
             '{"prompt": "c", "answer": 2.5, "domain": [3]}', '{"prompt": "d", "answer": 3, "domain": [4]}',
             '{"prompt": "e", "answer": 2.5, "domain": ["x"]}']
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _prompt_config(tmp_path / "c.jsonl", teacher_model="t", answer_column="answer")
    assert load_prompts(cfg).rows([0, 4]) == [{"prompt": "a", "answer": None}, {"prompt": "e", "answer": "2.5"}]
    source = OnPolicyConfig(**{**cfg.__dict__, "prompt_column": "domain"})
    with pytest.raises(ConfigError) as err:
        load_prompts(source)
    assert str(err.value) == (f"{tmp_path / 'c.jsonl'}: column 'domain' is list<item: int64> in the rows from "
                              f"{tmp_path / 'c.jsonl'} line 1 on and list<item: string> in those from "
                              f"{tmp_path / 'c.jsonl'} line 5 on: give the column one type in every row")


@pytest.mark.unit
def test_bad_prompt_rows_fail_in_one_line_naming_file_line_and_column(tmp_path, monkeypatch):
    import datasets
    import pyarrow.parquet as pq

    def jsonl(*lines: str) -> Path:
        path = tmp_path / f"p{len(list(tmp_path.iterdir()))}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        return path

    good = json.dumps({"prompt": "q", "answer": "1", "domain": "math"})
    routed = {"teacher_model": "math=org/a,code=org/b", "teacher_column": "domain"}
    cases = [
        (jsonl(good, "{oops"), {}, r"p\d\.jsonl line 2 is not valid JSON"),
        (jsonl(good, "[1, 2]"), {}, r"line 2 is a JSON list, expected an object"),
        (jsonl(good, json.dumps({"question": "q"})), {}, r"line 2: column\(s\) \['prompt'\] missing"),
        (jsonl(good, json.dumps({"prompt": None})), {}, r"line 2: column\(s\) \['prompt'\] empty"),
        (jsonl(good, json.dumps({"prompt": "q", "domain": "law"})), routed, r"line 2: teacher 'law' is not one of"),
        (jsonl(good, json.dumps({"prompt": "q"})), {"reward_weight": 0.5}, r"line 2: column\(s\) \['answer'\] missing"),
        (jsonl(""), {}, "holds no prompts"),
        (jsonl(good, '{"prompt": "caf\xe9"}'), {}, r"line 2 is not UTF-8 text"),  # rewritten below as latin-1
        (tmp_path / "missing.jsonl", {}, "does not exist"),
    ]
    latin = cases[-2][0]
    latin.write_bytes(latin.read_text().encode("latin-1"))
    (tmp_path / "broken.json").write_text('[{"prompt": "a"},\n {"prompt": "b"')
    cases.append((tmp_path / "broken.json", {}, r"broken\.json line 2 column 16 is not valid JSON"))
    pq.write_table(pa.table({"prompt": ["a", "b"], "domain": ["code", "law"]}), tmp_path / "t.parquet")
    cases.append((tmp_path / "t.parquet", routed, r"t\.parquet row 1: teacher 'law' is not one of"))
    pq.write_table(pa.table({"question": ["a"]}), tmp_path / "q.parquet")
    cases.append((tmp_path / "q.parquet", {}, r"q\.parquet: column\(s\) \['prompt'\] missing"))
    for path, settings, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_prompts(_prompt_config(path, **settings))

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/prompts' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ConfigError, match=r"could not load dataset org/prompts \(train\): Couldn't reach"):
        load_prompts(_prompt_config("org/prompts"))


@pytest.mark.unit
def test_every_prompt_is_rendered_and_fits_the_context_before_a_model_loads(tmp_path, tiny_student_dir, monkeypatch):
    import copy

    from llmdistill.cli import one_line
    from llmdistill.onpolicy import CHECK_ROWS, check_prompts, student_tokenizer_and_context
    from llmdistill.prompts import PromptError, PromptFormat

    rows = [{"prompt": f"{i} + {i} = ?"} for i in range(CHECK_ROWS + 10)]
    rows[CHECK_ROWS + 3] = {"prompt": "long " * 60}  # in the second chunk
    rows[CHECK_ROWS + 7] = {"prompt": "longer " * 80}
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = _prompt_config(path, student_model=str(tiny_student_dir), teacher_model=str(tiny_student_dir),
                         max_new_tokens=40, max_model_len=100)
    tokenizer, context = student_tokenizer_and_context(cfg)
    assert context == 100
    assert student_tokenizer_and_context(_prompt_config(path, student_model=str(tiny_student_dir)))[1] == 256
    prompts, fmt = load_prompts(cfg), PromptFormat()
    lengths = [len(ids) for ids in fmt.token_ids(tokenizer, [rows[CHECK_ROWS + 3]["prompt"]])]
    assert lengths[0] + 41 > 100  # the row is too long for the context, and only by the completion's room
    with pytest.raises(ConfigError) as err:
        check_prompts(prompts, fmt, tokenizer, cfg, context)
    assert one_line(err.value) == str(err.value)
    assert str(err.value).startswith(f"{path} row {CHECK_ROWS + 3}: the prompt is {lengths[0]} tokens, and with "
                                     f"max_new_tokens 40 and the teacher's scoring position it needs "
                                     f"{lengths[0] + 41}, more than max_model_len 100 (2 of {CHECK_ROWS + 10} prompts")
    check_prompts(prompts, fmt, tokenizer, _prompt_config(path, max_new_tokens=40, max_model_len=512), 512)  # fits

    (tmp_path / "empty.jsonl").write_text('{"prompt": "1 + 1 = ?"}\n{"prompt": "  "}\n')
    empty = load_prompts(_prompt_config(tmp_path / "empty.jsonl"))
    with pytest.raises(PromptError, match=r"empty\.jsonl row 1: the prompt is empty"):
        check_prompts(empty, fmt, tokenizer, cfg, context)
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    with pytest.raises(PromptError, match="has no chat template: set use_chat_template: false"):
        check_prompts(empty, fmt, plain, cfg, context)

    # the run refuses before the student (or any model) loads, and writes nothing
    monkeypatch.setattr(op, "load_student", lambda *a: pytest.fail("a model loaded before the prompts were checked"))
    with pytest.raises(ConfigError, match=f"row {CHECK_ROWS + 3}: the prompt is"):
        op.run_onpolicy(OnPolicyConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "out")}))
    assert not (tmp_path / "out").exists()
    # so is a student or teacher whose logits are not its LM head's output (here Gemma 2's soft-capping)
    import shutil

    from llmdistill.config.base import UserError

    capped = shutil.copytree(tiny_student_dir, tmp_path / "capped")
    (capped / "config.json").write_text(json.dumps({**json.loads((capped / "config.json").read_text()),
                                                    "final_logit_softcapping": 30.0}))
    for who in ("student_model", "teacher_model"):
        with pytest.raises(UserError, match=r"its config \(qwen2\) sets final_logit_softcapping=30.0, which"):
            op.run_onpolicy(OnPolicyConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "out"), who: str(capped)}))
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
def test_pack_marks_exactly_the_completion_tokens_as_targets():
    batch = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 6, 4, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert batch["target_index"].tolist() == [3, 4, 6, 7, 8]
    assert batch["target_ids"].tolist() == [5, 6, 7, 8, 9] and batch["seq_of_target"].tolist() == [0, 0, 1, 1, 1]
    # arrays (as unpack gives them) pack as lists do; a sample without completion has no targets
    arrays = pack([np.array([1, 2, 3], np.int32), np.array([7], np.int32), np.array([4], np.int32)],
                  [np.array([5, 6], np.int32), np.array([], np.int32), np.array([7, 8, 9], np.int32)])
    assert arrays["input_ids"].tolist() == [[1, 2, 3, 5, 6, 7, 4, 7, 8, 9]]
    assert arrays["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 0, 1, 2, 3]]
    assert arrays["target_index"].tolist() == [3, 4, 7, 8, 9] and arrays["seq_of_target"].tolist() == [0, 0, 2, 2, 2]
    assert all(v.dtype == torch.long for v in arrays.values())
    empty = pack([], [])
    assert empty["input_ids"].shape == (1, 0) and empty["target_index"].shape == (0,)
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        pack([[1], [2]], [[3]])


@pytest.mark.unit
def test_samples_are_forwarded_in_bounded_padded_batches_with_the_packed_hidden_states(tiny_student_dir):
    from llmdistill.teacher import forward_groups, predicting_hidden

    batch = pack([[1, 2, 3], [4], [5, 6], [7]], [[5, 6], [7, 8, 9], [1] * 9, [2]])  # samples of 5, 4, 11, 2 tokens
    assert forward_groups(batch["position_ids"][0], 9) == [[(9, 20)], [(0, 5)], [(5, 9), (20, 22)]]  # 11 alone
    assert forward_groups(batch["position_ids"][0], 100) == [[(9, 20), (0, 5), (5, 9), (20, 22)]]
    assert forward_groups(batch["position_ids"][0], 1) == [[(9, 20)], [(0, 5)], [(5, 9)], [(20, 22)]]
    model, _ = load_student(str(tiny_student_dir))
    ids, pos = batch["input_ids"], batch["position_ids"]
    with torch.no_grad():
        packed = model.base_model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0]
        for max_tokens in (1, 9, 10_000):
            hidden, head = predicting_hidden(model, batch, max_tokens=max_tokens)
            torch.testing.assert_close(hidden, packed[batch["target_index"] - 1], rtol=0, atol=1e-5)
    assert head is model.get_output_embeddings()


@pytest.mark.unit
def test_a_teacher_grades_group_by_group_what_one_packed_forward_gives(tiny_student_dir):
    """Each forward group hands on only the states that predict a target, and the teacher turns them
    into top-k at once: the same grades as the whole batch's log-softmax, for any group size."""
    from llmdistill.teacher import TransformersTeacher, hidden_by_group

    batch = pack([[1, 2, 3], [4], [5, 6], [7]], [[5, 6], [7, 8, 9], [1] * 9, [2]])
    teacher = TransformersTeacher(str(tiny_student_dir), "float32")
    with torch.no_grad():
        packed = teacher.model.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                          use_cache=False).last_hidden_state[0]  # packed: one mask per sample
        logp = torch.log_softmax(teacher.model.lm_head(packed[batch["target_index"] - 1]), -1)
    top = logp.topk(3, dim=-1)
    for pack_tokens in (1, 9, 10_000):
        teacher.pack_tokens = pack_tokens
        with torch.no_grad():
            groups = list(hidden_by_group(teacher.model, batch, pack_tokens))
        assert all(len(rows) == len(h) for rows, h in groups)  # no prompt position leaves its group
        assert sorted(torch.cat([rows for rows, _ in groups]).tolist()) == list(range(len(batch["target_ids"])))
        graded = teacher.score(batch, k=3, chunk_size=4)
        assert torch.equal(graded["teacher_ids"], top.indices)
        torch.testing.assert_close(graded["teacher_logprobs"], top.values, rtol=0, atol=1e-5)
        torch.testing.assert_close(graded["teacher_token_logprobs"],
                                   logp.gather(-1, batch["target_ids"][:, None])[:, 0], rtol=0, atol=1e-5)


@pytest.mark.unit
def test_rewards_are_the_checkers_verdicts_and_nan_where_a_prompt_has_no_reference(tiny_tokenizer):
    """An answer column filled on some rows only: those samples get no verdict (NaN), so every process
    sums the same counts whatever its share holds, and the logged reward is over the checked ones."""
    from llmdistill.onpolicy import Rollouts, answer_rewards

    texts = ["<think>1+2=3</think>\\boxed{3}", "<think>1+2=4</think>\\boxed{4}", "\\boxed{5}", "\\boxed{6}"]
    rollouts = Rollouts(prompt_ids=[[1]] * 4, completion_ids=[tiny_tokenizer.encode(t) for t in texts],
                        records=[{"answer": "3"}, {"answer": "3"}, {"answer": None}, {}], teachers=["default"] * 4)
    cfg = OnPolicyConfig(dataset="p", student_model="s", teacher_model="t")
    rewards = answer_rewards(rollouts, tiny_tokenizer, cfg)
    assert rewards[:2].tolist() == [1.0, 0.0] and torch.isnan(rewards[2:]).all()
    none = Rollouts(prompt_ids=[[1]], completion_ids=[[2]], records=[{}], teachers=["default"])
    assert torch.isnan(answer_rewards(none, tiny_tokenizer, cfg)).all()  # a share without any reference
    assert answer_rewards(rollouts, tiny_tokenizer, OnPolicyConfig(dataset="p", student_model="s", teacher_model="t",
                                                                   answer_column=None)) is None


@pytest.mark.unit
def test_config_needs_its_inputs_and_names_multi_teacher_routing():
    base = dict(dataset="p.jsonl", student_model="s", teacher_model="t")
    assert OnPolicyConfig(**base).teachers == {"default": "t"}
    assert OnPolicyConfig(**{**base, "teacher_model": "math=a,code=b", "teacher_column": "domain"}).teachers == \
        {"math": "a", "code": "b"}
    with pytest.raises(ConfigError, match="teacher_column"):
        OnPolicyConfig(**{**base, "teacher_model": "math=a,code=b"})
    # a path with '=' in it is one unnamed teacher; one named teacher needs no column; a name twice fails
    assert OnPolicyConfig(**{**base, "teacher_model": "runs/lr=1e-4/final"}).teachers == {"default": "runs/lr=1e-4/final"}
    assert OnPolicyConfig(**{**base, "teacher_model": "math=runs/lr=1e-4"}).teachers == {"math": "runs/lr=1e-4"}
    with pytest.raises(ConfigError, match="the name 'math' is given twice"):
        OnPolicyConfig(**{**base, "teacher_model": "math=a,math=b", "teacher_column": "domain"})
    with pytest.raises(ConfigError, match="offline_data_dir"):
        OnPolicyConfig(**base, on_policy_fraction=0.5)
    with pytest.raises(ConfigError, match="objective must be one of"):
        OnPolicyConfig(**base, on_policy_fraction=0.5, offline_data_dir="b", objective="sampled_reverse_kl")
    # pure offline KD needs neither prompts nor a teacher
    assert OnPolicyConfig(student_model="s", on_policy_fraction=0.0, offline_data_dir="b").max_steps == 100
    with pytest.raises(ConfigError, match="temperature=0.0 must be > 0"):
        OnPolicyConfig(**base, temperature=0.0)
    with pytest.raises(ConfigError, match="top-k objectives only"):
        OnPolicyConfig(**base, temperature=2.0, objective="sampled_reverse_kl")
    for sampling in ({"rollout_temperature": 0.6}, {"rollout_top_p": 0.9}):  # not the student's own distribution
        with pytest.raises(ConfigError, match="gradient only for tokens drawn from the student's own distribution"):
            OnPolicyConfig(**base, objective="sampled_reverse_kl", **sampling)
    assert OnPolicyConfig(**base, objective="reverse_kl", rollout_temperature=0.6).rollout_temperature == 0.6
    # settings that would do nothing, or fail only at the first step, fail here
    for settings, message in (
            ({"offline_data_dir": "b"}, "read only by offline steps: set on_policy_fraction below 1"),
            ({"reward_weight": 0.5, "answer_column": None}, "reward_weight=0.5 .* set answer_column"),
            ({"checker": "numerc"}, r"checker='numerc' is not one of \['math', 'numeric', 'exact', 'choice'\]"),
            ({"checker": "code"}, "checker='code' is not one of"),  # code tests are no answer column
            ({"sleep_mode": True, "rollout_backend": "transformers"}, "sleep_mode is for the colocated vLLM engine"),
            # the loss reads the head's weight, not a LoRA layer's output (train shares LoraSettings)
            ({"use_peft": True, "lora_target_modules": "q_proj, lm_head"}, r"names the LM head \(lm_head\)")):
        with pytest.raises(ConfigError, match=message):
            OnPolicyConfig(**base, **settings)


@pytest.mark.unit
def test_config_of_teacher_servers():
    base = dict(dataset="p.jsonl", student_model="s", teacher_model="t", teacher_backend="server")
    with pytest.raises(ConfigError, match="needs teacher_urls"):
        OnPolicyConfig(**base)
    assert OnPolicyConfig(**base, teacher_urls=["http://a:1", "http://b:1/?x=1"]).teacher_url_pools == \
        {"default": ["http://a:1", "http://b:1/?x=1"]}
    two = {**base, "teacher_model": "math=M,code=C", "teacher_column": "domain"}
    assert OnPolicyConfig(**two, teacher_urls=["math=http://a:1", "code=http://b:1", "math=http://c:1"]
                          ).teacher_url_pools == {"math": ["http://a:1", "http://c:1"], "code": ["http://b:1"]}
    with pytest.raises(ConfigError, match=r"no URL in teacher_urls for teacher\(s\) \['code'\]"):
        OnPolicyConfig(**two, teacher_urls=["math=http://a:1"])
    with pytest.raises(ConfigError, match="must be 'name=url'"):
        OnPolicyConfig(**two, teacher_urls=["http://a:1"])
    with pytest.raises(ConfigError, match="max_logprobs=20.*--max-logprobs"):
        OnPolicyConfig(**base, teacher_urls=["http://a:1"], logprobs_top_k=32)
    assert OnPolicyConfig(**base, teacher_urls=["http://a:1"], logprobs_top_k=32, teacher_max_logprobs=32)
    with pytest.raises(ConfigError, match="teacher_urls are for teacher_backend: server"):
        OnPolicyConfig(**{**base, "teacher_backend": "transformers"}, teacher_urls=["http://a:1"])


@pytest.mark.unit
def test_the_offline_steps_are_a_seeded_choice_by_step_index():
    chosen = offline_steps(seed=0, on_policy_fraction=0.25, num_steps=400)
    assert 0.65 < chosen.mean() < 0.85  # about 1 - lambda of the steps
    assert np.array_equal(offline_steps(0, 0.25, 37), chosen[:37])  # a step's choice does not depend on max_steps
    assert not np.array_equal(offline_steps(1, 0.25, 400), chosen)
    assert offline_steps(0, 0.0, 50).all() and not offline_steps(0, 1.0, 50).any()

def _dense_reference(student, batch, teacher_logits, objective, temperature=1.0):
    """Per-token mean loss from full-vocabulary logits, float64, by the textbook formulas (reverse KL at
    temperature T: both sides ``log_softmax(logits / T)``, scaled by T^2)."""
    hidden = student.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                use_cache=False).last_hidden_state[0]  # packed: each sample attends to itself only
    logits = student.get_output_embeddings()(hidden[batch["target_index"] - 1]).double()
    if objective == "reverse_kl":
        s = torch.log_softmax(logits / temperature, -1)
        t = torch.log_softmax(teacher_logits.double() / temperature, -1)
        return temperature**2 * (s.exp() * (s - t)).sum(-1).mean()
    s = torch.log_softmax(logits, -1)
    t = torch.log_softmax(teacher_logits.double(), -1)
    lp = s.gather(-1, batch["target_ids"][:, None])[:, 0]
    advantage = (t.gather(-1, batch["target_ids"][:, None])[:, 0] - lp).detach()
    return -(advantage * lp).mean()


@pytest.mark.unit
@pytest.mark.parametrize(("objective", "temperature"),
                         [("reverse_kl", 1.0), ("reverse_kl", 2.0), ("sampled_reverse_kl", 1.0)])
def test_loss_and_gradients_equal_a_dense_reference(objective, temperature, tiny_student_dir):
    """With k = the whole vocabulary the top-k support is exact: the sparse loss is the dense one."""
    torch.manual_seed(0)
    student, _ = load_student(str(tiny_student_dir))
    student.double()
    vocab = student.config.vocab_size
    batch = pack([[1, 5, 9], [3, 4]], [[11, 12, 13, 2], [20, 21]])
    teacher_logits = torch.randn(len(batch["target_ids"]), vocab, dtype=torch.float64) * 3
    t = torch.log_softmax(teacher_logits, -1)
    top = t.topk(vocab, -1)
    graded = {**batch, "teacher_ids": top.indices, "teacher_logprobs": top.values,
              "teacher_token_logprobs": t.gather(-1, batch["target_ids"][:, None])[:, 0]}
    cfg = OnPolicyConfig(dataset="p", student_model="s", teacher_model="t", objective=objective, loss_chunk_size=3,
                         temperature=temperature)
    loss, _ = onpolicy_loss(student, graded, cfg)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    ref = _dense_reference(student, batch, teacher_logits, objective, temperature)
    ref_grads = torch.autograd.grad(ref, list(student.parameters()))
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-10)


@pytest.mark.unit
@pytest.mark.parametrize("objective", ["reverse_kl", "sampled_reverse_kl"])
def test_micro_batches_add_up_to_the_steps_gradients(objective, tiny_student_dir):
    """Whole samples per micro-batch (a longer one alone); their backward passes sum to the step's."""
    from llmdistill.onpolicy import micro_batches, step_gradients

    torch.manual_seed(0)
    student, _ = load_student(str(tiny_student_dir))
    student.double()
    batch = pack([[1, 5, 9], [3, 4], [7, 8, 9, 10], [6]], [[11, 12, 13, 2], [20, 21, 22], [30, 31, 32, 33, 34], [5, 6, 7]])
    n, k = len(batch["target_ids"]), 8
    top = torch.log_softmax(torch.randn(n, student.config.vocab_size, dtype=torch.float64) * 3, -1).topk(k, -1)
    graded = {**batch, "teacher_ids": top.indices, "teacher_logprobs": top.values,
              "teacher_token_logprobs": top.values[:, 0] - 0.5}
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    groups = micro_batches(graded, 9)  # samples of 7, 5, 9 and 4 positions: [7], [5], [9], [4]
    assert [g["input_ids"].shape[1] for g in groups] == [7, 5, 9, 4]
    assert [len(g) for g in (micro_batches(graded, 12), micro_batches(graded, 100))] == [3, 1]
    assert [g["input_ids"].shape[1] for g in micro_batches(graded, 6)] == [7, 5, 9, 4]  # longer ones alone
    for g in groups:
        assert torch.equal(g["input_ids"][0, g["target_index"]], g["target_ids"])
    assert torch.equal(torch.cat([g["seq_of_target"] for g in groups]), batch["seq_of_target"])

    cfg = OnPolicyConfig(dataset="p", student_model="s", teacher_model="t", objective=objective, loss_chunk_size=3,
                         reward_weight=0.5, logprobs_top_k=k)
    loss, whole_stats = onpolicy_loss(student, graded, cfg, rewards)
    whole = torch.autograd.grad(loss, list(student.parameters()))
    stats = step_gradients(student, graded, OnPolicyConfig(**{**cfg.__dict__, "micro_batch_tokens": 9}), rewards)
    for g, p in zip(whole, student.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
    assert stats.keys() == whole_stats.keys()
    for key in stats:
        assert stats[key] == pytest.approx(whole_stats[key], rel=1e-9)


@pytest.mark.unit
def test_gradient_checkpointing_keeps_the_gradients_and_bf16_stays_close(tiny_student_dir):
    """Recomputing activations in the backward changes no gradient (float64); bfloat16 autocast moves the
    loss by under 1% and keeps every weight's gradient direction (cosine > 0.99)."""
    from llmdistill.onpolicy import step_gradients

    batch = pack([[1, 5, 9], [3, 4], [7, 8, 9, 10]], [[11, 12, 13, 2], [20, 21, 22], [30, 31, 32, 33, 34]])
    n, k = len(batch["target_ids"]), 8
    generator = torch.Generator().manual_seed(0)

    def run(dtype: torch.dtype, **settings) -> tuple[dict[str, float], list[torch.Tensor], int]:
        student, _ = load_student(str(tiny_student_dir))
        student.to(dtype).train()
        if settings.pop("checkpointing", False):
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls, attention = [], student.model.layers[0].self_attn
        forward = attention.forward

        def counted(*args, **kwargs):  # also called when the backward recomputes the layer
            calls.append(1)
            return forward(*args, **kwargs)

        attention.forward = counted
        top = torch.log_softmax(torch.randn(n, student.config.vocab_size, generator=generator.manual_seed(0)) * 3,
                                -1).to(dtype).topk(k, -1)
        graded = {**batch, "teacher_ids": top.indices, "teacher_logprobs": top.values}
        cfg = OnPolicyConfig(dataset="p", student_model="s", teacher_model="t", logprobs_top_k=k, loss_chunk_size=4,
                             **settings)
        stats = step_gradients(student, graded, cfg)
        return stats, [p.grad.double() for p in student.parameters()], len(calls)

    plain, grads, forwards = run(torch.float64)
    recomputed, again, recomputing = run(torch.float64, checkpointing=True, gradient_checkpointing=True)
    assert recomputing == 2 * forwards  # the layer ran again in the backward
    assert recomputed["loss"] == pytest.approx(plain["loss"], rel=1e-12)
    for a, b in zip(grads, again, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    half, rough, _ = run(torch.float32, bf16=True)
    assert half["loss"] == pytest.approx(plain["loss"], rel=1e-2)
    for a, b in zip(grads, rough, strict=True):
        if a.norm() > 1e-8:
            assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99

    # a LoRA student on a bf16 base (what bf16 + use_peft loads): its fp32 adapter's gradients against fp32's
    from llmdistill.onpolicy import with_lora

    lora_cfg = OnPolicyConfig(dataset="p", student_model="s", teacher_model="t", logprobs_top_k=k, loss_chunk_size=4,
                              use_peft=True, lora_r=4, lora_dropout=0.0)
    results = []
    for dtype, bf16 in ((torch.float32, False), (torch.bfloat16, True)):
        torch.manual_seed(0)  # the same adapter (A at peft's init, B drawn below) on either base
        student, adapter = with_lora(load_student(str(tiny_student_dir), dtype)[0], lora_cfg, None)
        top = torch.log_softmax(torch.randn(n, student.config.vocab_size, generator=generator.manual_seed(0)) * 3,
                                -1).topk(k, -1)
        graded = {**batch, "teacher_ids": top.indices, "teacher_logprobs": top.values}
        for name, p in student.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        student.train()
        stats = step_gradients(student, graded, OnPolicyConfig(**{**lora_cfg.__dict__, "bf16": bf16}))
        trained = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
        assert trained and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for _, p in trained)
        results.append((stats["loss"], torch.cat([p.grad.flatten() for _, p in trained])))
    (full_loss, full_grad), (half_loss, half_grad) = results
    assert half_loss == pytest.approx(full_loss, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(full_grad, half_grad, dim=0) > 0.99


class _RecordingLLM:
    """Stands in for ``vllm.LLM``: records the calls the loop makes on its rollout engine."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        model_config = types.SimpleNamespace(get_vocab_size=lambda: 64, max_logprobs=kwargs.get("max_logprobs", 20))
        self.llm_engine = types.SimpleNamespace(model_config=model_config)

    def get_tokenizer(self):
        return [None] * 64  # as many ids as the LM head has rows

    def generate(self, prompts, params, use_tqdm=False, lora_request=None):
        self.calls.append("generate")
        completion = types.SimpleNamespace(token_ids=[5, 2])
        return [types.SimpleNamespace(outputs=[completion] * params.n) for _ in prompts]

    def sleep(self, level):
        self.calls.append(f"sleep {level}")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up {','.join(tags) if tags else 'all'}")

    def collective_rpc(self, method, kwargs):
        self.calls.append(method)

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


@pytest.mark.unit
@pytest.mark.parametrize("sync_every", [1, 2])
def test_sleep_mode_frees_the_engine_while_the_student_trains(sync_every, tiny_student_dir, monkeypatch):
    """On a GPU the engine sleeps after each step's rollouts and wakes before the next: level 2 (weights
    dropped) when every step syncs, the weights back before the KV cache; level 1 otherwise. On a CPU
    (the fallback that runs here) it stays awake."""
    import vllm

    from llmdistill.onpolicy import VllmRollout

    monkeypatch.setattr(vllm, "LLM", lambda model, tokenizer, **kwargs: _RecordingLLM(**kwargs))
    model, _ = load_student(str(tiny_student_dir))
    cfg = OnPolicyConfig(dataset="p", student_model="s", teacher_model="t", sleep_mode=True, sync_every=sync_every,
                         samples_per_prompt=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engine = VllmRollout(str(tiny_student_dir), cfg)
    assert engine.llm.kwargs["enable_sleep_mode"] is True
    for step in range(2):  # as train_step: rollouts, sleep, (the update), wake with a sync when due
        engine.sample([[1, 2]], cfg)
        engine.sleep()
        engine.wake(model, sync=(step + 1) % sync_every == 0)
    if sync_every == 1:
        one = ["generate", "sleep 2", "wake_up weights", "reload_weights", "reset_prefix_cache", "wake_up kv_cache"]
        assert engine.llm.calls == one * 2
    else:
        assert engine.llm.calls == ["generate", "sleep 1", "wake_up all",
                                    "generate", "sleep 1", "wake_up all", "reload_weights", "reset_prefix_cache"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    awake = VllmRollout(str(tiny_student_dir), cfg)
    assert "enable_sleep_mode" not in awake.llm.kwargs
    awake.sample([[1, 2]], cfg)
    awake.sleep()
    awake.wake(model, sync=True)
    assert awake.llm.calls == ["generate", "reload_weights", "reset_prefix_cache"]


@pytest.mark.unit
def test_on_gpus_each_training_process_starts_its_engines_in_the_launchers_process_group(tiny_student_dir, monkeypatch):
    """Several training processes on GPUs (validated on paper): the rollout engine and an in-process vLLM teacher
    of each process run as vLLM's external_launcher (one engine per process and GPU, TRL's colocate mode),
    seeded per process; one process, or a CPU host, keeps vLLM's own executor."""
    import vllm

    from llmdistill.distributed import Ranks
    from llmdistill.onpolicy import VllmRollout, VllmTeacher

    made = []
    monkeypatch.setattr(vllm, "LLM", lambda **kwargs: made.append(kwargs) or _RecordingLLM(**kwargs))
    cfg = OnPolicyConfig(dataset="p", student_model="s", teacher_model="t", teacher_backend="vllm", seed=5)
    for gpus, ranks in ((True, Ranks(rank=1, world=2)), (True, Ranks()), (False, Ranks(rank=1, world=2))):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpus=gpus: gpus)
        made.clear()
        VllmRollout(str(tiny_student_dir), cfg, ranks=ranks)
        VllmTeacher(str(tiny_student_dir), cfg, ranks)
        assert [m["seed"] for m in made] == [5 + ranks.rank] * 2
        expected = "external_launcher" if gpus and ranks.world > 1 else None
        assert [m.get("distributed_executor_backend") for m in made] == [expected] * 2
        assert made[1]["enable_prefix_caching"] is False  # the teacher computes every position it grades


# ---- with real models and engines --------------------------------------------------------------


@pytest.mark.unit
def test_a_lora_students_merged_weights_are_peft_merge_under_the_plain_names(tiny_student_dir):
    import copy

    from llmdistill.onpolicy import merged_weights, with_lora

    plain, _ = load_student(str(tiny_student_dir))
    assert [k for k, _ in merged_weights(plain)] == list(plain.state_dict())
    cfg = OnPolicyConfig(dataset="p.jsonl", student_model="org/s", teacher_model="org/t", use_peft=True, lora_r=4)
    model, adapter = with_lora(plain, cfg, None)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a trained adapter: B is zero only at the start
    merged = dict(merged_weights(model))
    reference = copy.deepcopy(adapter).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           model.state_dict()["model.layers.0.self_attn.q_proj.base_layer.weight"])


@pytest.mark.integration
def test_the_teachers_grades_equal_a_plain_forward_and_sync_makes_the_engine_the_trainer(
        prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path):
    """The grades of a step's rollouts, from the teacher in process (transformers, and a vLLM engine beside the
    rollout engine), equal a plain forward of the teacher on each sample; after one update and a sync the
    rollout engine's log-probs of its own samples are the trainer's."""
    from transformers import AutoModelForCausalLM

    from llmdistill.onpolicy import VllmRollout, VllmTeacher, rollout
    from llmdistill.prompts import PromptFormat
    from llmdistill.teacher import TransformersTeacher

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    cfg = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "o")
    student, tok = load_student(str(tiny_student_dir))
    engine, in_vllm = VllmRollout(str(tiny_student_dir), cfg), None
    try:
        stream = PromptStream(load_prompts(cfg), cfg.seed, Cursor(cfg.prompts_per_step))
        rollouts = rollout(engine, stream, [0], PromptFormat(), tok, cfg)[0]
        graded = score({"default": TransformersTeacher(str(tiny_random_teacher_dir), "float32")}, rollouts, cfg)
        in_vllm = VllmTeacher(str(tiny_random_teacher_dir), cfg)  # teacher_backend vllm, beside the rollout engine
        by_vllm = score({"default": in_vllm}, rollouts, cfg)
        # every target's grade equals the teacher's own forward of that sample alone
        teacher = AutoModelForCausalLM.from_pretrained(str(tiny_random_teacher_dir), dtype=torch.float32).eval()
        offset = 0
        for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True):
            with torch.no_grad():
                logp = torch.log_softmax(teacher(torch.tensor([p + c])).logits[0, len(p) - 1:-1], -1)
            top = logp.topk(cfg.logprobs_top_k, -1)
            own = logp[torch.arange(len(c)), torch.tensor(c)]
            rows = slice(offset, offset + len(c))
            torch.testing.assert_close(graded["teacher_logprobs"][rows], top.values, rtol=0, atol=1e-5)
            assert graded["teacher_ids"][rows].tolist() == top.indices.tolist()
            torch.testing.assert_close(by_vllm["teacher_logprobs"][rows], top.values, rtol=0, atol=1e-4)
            torch.testing.assert_close(by_vllm["teacher_token_logprobs"][rows], own, rtol=0, atol=1e-4)
            assert by_vllm["teacher_ids"][rows].tolist() == top.indices.tolist()
            offset += len(c)
        assert offset == len(by_vllm["teacher_ids"]) > 0

        # one optimizer step, then a sync: the engine's log-probs of its own samples are the trainer's
        loss, _ = onpolicy_loss(student, graded, cfg)
        loss.backward()
        torch.optim.SGD(student.parameters(), lr=0.5).step()
        engine.sync(student)
        from vllm import SamplingParams

        out = engine.llm.generate([{"prompt_token_ids": rollouts.prompt_ids[0]}],
                                  SamplingParams(max_tokens=12, logprobs=0, temperature=1.0), use_tqdm=False)[0]
        ids = list(out.outputs[0].token_ids)
        engine_lp = torch.tensor([d[t].logprob for d, t in zip(out.outputs[0].logprobs, ids, strict=True)])
        with torch.no_grad():
            p = rollouts.prompt_ids[0]
            logp = torch.log_softmax(student(torch.tensor([p + ids])).logits[0, len(p) - 1:-1], -1)
        torch.testing.assert_close(engine_lp, logp[torch.arange(len(ids)), torch.tensor(ids)], rtol=0, atol=1e-4)
    finally:
        engine.close()
        if in_vllm is not None:
            in_vllm.close()


@pytest.mark.integration
def test_a_group_graded_at_once_gives_each_step_the_grades_of_its_own_scoring(tiny_student_dir,
                                                                            tiny_random_teacher_dir):
    """``steps_per_rollout``: the teachers grade a group's samples in one call each; every step's batch
    equals :func:`score` of that step alone, teachers routed per sample (one step all one teacher's)."""
    from llmdistill.onpolicy import Rollouts, score_group
    from llmdistill.teacher import TransformersTeacher

    cfg = OnPolicyConfig(dataset="p", student_model="s", teacher_model=f"a={tiny_random_teacher_dir},b={tiny_student_dir}",
                         teacher_column="domain", steps_per_rollout=3)
    teachers = {name: TransformersTeacher(path, "float32", pack_tokens=64) for name, path in cfg.teachers.items()}
    rng = np.random.default_rng(0)

    def sample() -> list[int]:
        return rng.integers(5, 200, int(rng.integers(1, 20))).tolist()

    routes = [["a", "b", "b", "a"], ["b", "b"], ["a", "b", "a"]]
    group = [Rollouts(prompt_ids=[sample() for _ in r], completion_ids=[sample() for _ in r], records=[{}] * len(r),
                      teachers=r) for r in routes]
    graded = score_group(teachers, group, cfg)
    assert len(graded) == 3
    for rollouts, batch in zip(group, graded, strict=True):
        alone = score(teachers, rollouts, cfg)
        assert set(batch) == set(alone)
        for key in ("input_ids", "position_ids", "target_index", "target_ids", "seq_of_target", "teacher_ids"):
            assert torch.equal(batch[key], alone[key]), key
        for key in ("teacher_logprobs", "teacher_token_logprobs"):
            torch.testing.assert_close(batch[key], alone[key], rtol=0, atol=1e-5)
        assert batch["teacher_token_logprobs"].lt(0).all()  # every target graded by its teacher


@pytest.mark.integration
@pytest.mark.parametrize("lora_rollouts", ["merged", "adapter"])
def test_after_a_sync_the_engine_samples_from_the_lora_student(lora_rollouts, prompts, tiny_student_dir,
                                                               tiny_random_teacher_dir, tmp_path):
    """The engine holds the plain student; a sync loads base + adapter delta (merged), or the adapter as
    a vLLM LoRA: either way its log-probs of its own samples are the LoRA student's (fp32, within 1e-4)."""
    from vllm import SamplingParams

    from llmdistill.onpolicy import VllmRollout, with_lora

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    cfg = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "o", use_peft=True, lora_r=4,
                 lora_rollouts=lora_rollouts)
    plain, tok = load_student(str(tiny_student_dir))
    student, adapter = with_lora(plain, cfg, None)
    engine = VllmRollout(str(tiny_student_dir), cfg, adapter)
    try:
        for seed in (0, 1):  # two updates of the adapter, each synced: the engine follows the latest
            torch.manual_seed(seed)
            for name, p in student.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.05)
            engine.sync(student)
        if lora_rollouts == "adapter":
            assert [d.name for d in (tmp_path / "o" / "rollout-weights").iterdir()] == ["weights-000002"]
            assert (tmp_path / "o" / "rollout-weights" / "weights-000002" / "adapter_config.json").is_file()
        prompt = tok("12+345=", add_special_tokens=False)["input_ids"]
        out = engine.llm.generate([{"prompt_token_ids": prompt}],
                                  SamplingParams(max_tokens=12, logprobs=0, temperature=1.0), use_tqdm=False,
                                  lora_request=engine.lora_request)[0]
        ids = list(out.outputs[0].token_ids)
        engine_lp = torch.tensor([d[t].logprob for d, t in zip(out.outputs[0].logprobs, ids, strict=True)])
        student.eval()
        with torch.no_grad():
            logp = torch.log_softmax(student(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1], -1)
            base = torch.log_softmax(load_student(str(tiny_student_dir))[0](torch.tensor([prompt + ids])).logits[
                0, len(prompt) - 1:-1], -1)
        picked = logp[torch.arange(len(ids)), torch.tensor(ids)]
        torch.testing.assert_close(engine_lp, picked, rtol=0, atol=1e-4)
        assert (picked - base[torch.arange(len(ids)), torch.tensor(ids)]).abs().max() > 1e-2  # the adapter counts
    finally:
        engine.close()


def run_script(script: str, cfg: OnPolicyConfig, tmp_path: Path, more: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``script`` (it reads an OnPolicyConfig's fields as JSON from argv[1]) in a fresh interpreter, with
    the fields :func:`config` sets and ``more``."""
    path = tmp_path / "run.py"
    path.write_text(textwrap.dedent(script))
    fields = ("dataset", "student_model", "teacher_model", "output_dir", "prompts_per_step", "max_new_tokens",
              "max_steps", "learning_rate", "logprobs_top_k", "logging_steps", "max_model_len", "seed",
              "rollout_backend", *more)
    args = json.dumps({k: getattr(cfg, k) for k in fields})
    return subprocess.run([sys.executable, str(path), args], capture_output=True, text=True, timeout=600)


KILLED_RUN = """
import os, signal, sys
import llmdistill.onpolicy as op
from llmdistill.config.base import load_config
from llmdistill.config.onpolicy import OnPolicyConfig
real = op.save_checkpoint
def save_then_die(*args, **kwargs):
    path = real(*args, **kwargs)
    if path.name == "checkpoint-2":
        os.kill(os.getpid(), signal.SIGKILL)
    return path
op.save_checkpoint = save_then_die
op.run_onpolicy(OnPolicyConfig(**__import__("json").loads(sys.argv[1])))
"""


@pytest.mark.integration
@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_a_killed_run_resumes_with_the_prompt_stream_at_the_right_place(
        prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path, use_peft):
    """transformers rollouts (the torch RNG is checkpointed): the resumed run ends bit-identical, a LoRA
    student's (its checkpoints hold the adapter) too."""
    from llmdistill.onpolicy import ADAPTER_DIR, run_onpolicy

    common = dict(rollout_backend="transformers", max_steps=4, save_steps=2, max_new_tokens=16, use_peft=use_peft,
                  lora_r=4, learning_rate=1e-2 if use_peft else 1e-3,
                  micro_batch_tokens=64 if use_peft else 0)  # the LoRA run also backpropagates a sample at a time
    whole = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "whole", **common, save_total_limit=1)
    run_onpolicy(whole)
    assert [p.name for p in op.complete_checkpoints(tmp_path / "whole")] == ["checkpoint-4"]  # checkpoint-2 removed
    assert not (tmp_path / "whole" / "checkpoint-2").exists()
    killed = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "killed", **common)
    res = run_script(KILLED_RUN, killed, tmp_path, ("save_steps", "use_peft", "lora_r", "micro_batch_tokens"))
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    state = json.loads((tmp_path / "killed" / "checkpoint-2" / "state.json").read_text())
    assert state["streams"] == {"prompts_per_step": killed.prompts_per_step,
                                "prompt_position": 2 * killed.prompts_per_step}
    assert (tmp_path / "killed" / "checkpoint-2" / "adapter_config.json").is_file() == use_peft
    with pytest.raises(ConfigError, match="use_peft"):  # a checkpoint resumed with the other setting
        run_onpolicy(OnPolicyConfig(**{**killed.__dict__, "resume_from_checkpoint": "latest", "use_peft": not use_peft}))
    manifest = run_onpolicy(OnPolicyConfig(**{**killed.__dict__, "resume_from_checkpoint": "latest"}))
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert manifest["counts"]["optimizer_steps"] == 4
    base = load_file(str(Path(tiny_student_dir) / "model.safetensors"))
    assert a.keys() == base.keys()  # a plain checkpoint either way (LoRA: merged), trained
    assert not all(torch.equal(a[k], base[k]) for k in a)
    if use_peft:  # only the adapted (linear) weights moved; the adapter is saved beside
        assert all(torch.equal(a[k], base[k]) for k in a if "proj" not in k)
        assert (tmp_path / "killed" / ADAPTER_DIR / "adapter_config.json").is_file()


@pytest.mark.integration
def test_steps_per_rollout_trains_a_group_on_one_batch_and_resumes_inside_a_group(
        prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path):
    """steps_per_rollout 2 (transformers rollouts: the torch RNG is checkpointed): each group of two
    steps trains on one sampling of the weights at its start; a resume at a group's start ends
    bit-identical; a resume inside a group samples the rest of the group from the checkpoint's weights."""
    from llmdistill.onpolicy import run_onpolicy

    common = dict(rollout_backend="transformers", max_steps=4, save_steps=1, max_new_tokens=16, steps_per_rollout=2)
    run_onpolicy(config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "whole", **common))

    def lags(out: Path) -> list[float]:
        return [entry["policy_lag"] for entry in json.loads((out / "log_history.json").read_text())]

    assert lags(tmp_path / "whole") == [0.0, 1.0, 0.0, 1.0]
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    for checkpoint, resumed_lags in (("checkpoint-2", [0.0, 1.0]), ("checkpoint-1", [0.0, 0.0, 1.0])):
        out = tmp_path / f"from-{checkpoint}"
        manifest = run_onpolicy(config(prompts, tiny_student_dir, tiny_random_teacher_dir, out, **common,
                                       resume_from_checkpoint=str(tmp_path / "whole" / checkpoint)))
        assert manifest["counts"]["optimizer_steps"] == 4
        assert lags(out) == lags(tmp_path / "whole")[:int(checkpoint[-1])] + resumed_lags
        resumed = load_file(str(out / "model.safetensors"))
        assert all(torch.equal(whole[k], resumed[k]) for k in whole) == (checkpoint == "checkpoint-2")


TERMINATED_RUN = """
import os, signal, sys
import llmdistill.onpolicy as op
from llmdistill.config.onpolicy import OnPolicyConfig
real = op.train_step
def step_then_term(step, *args, **kwargs):
    stats = real(step, *args, **kwargs)
    if step == 1:  # a scheduler's SIGTERM arrives during the second step
        os.kill(os.getpid(), signal.SIGTERM)
    return stats
op.train_step = step_then_term
op.run_onpolicy(OnPolicyConfig(**__import__("json").loads(sys.argv[1])))
"""


@pytest.mark.integration
def test_a_sigterm_stops_after_the_step_with_a_checkpoint_that_resumes_exactly(
        prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path):
    """Slurm's time-limit SIGTERM: the run saves checkpoint-2 although save_steps is 0, exits 143 with one
    line saying how to resume, and the resumed run ends bit-identical to an uninterrupted one."""
    from llmdistill.onpolicy import run_onpolicy

    common = dict(rollout_backend="transformers", max_steps=4, max_new_tokens=16, logging_steps=1)
    whole = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "whole", **common)
    run_onpolicy(whole)
    stopped = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "stopped", **common)
    res = run_script(TERMINATED_RUN, stopped, tmp_path)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-2000:]
    said = " ".join(res.stderr.split())  # the log wraps its lines
    assert "stopped by SIGTERM after step 2 of 4" in said and "--resume_from_checkpoint latest" in said
    assert sorted(p.name for p in (tmp_path / "stopped").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (tmp_path / "stopped" / "manifest.json").exists()
    manifest = run_onpolicy(OnPolicyConfig(**{**stopped.__dict__, "resume_from_checkpoint": "latest"}))
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert manifest["counts"]["optimizer_steps"] == 4
    history = json.loads((tmp_path / "stopped" / "log_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    # the run's time counts both processes: elapsed_s goes on from the checkpoint's, the manifest has the total
    saved = json.loads((tmp_path / "stopped" / "checkpoint-2" / "state.json").read_text())["wall_time_total_s"]
    elapsed = [h["elapsed_s"] for h in history]
    assert elapsed == sorted(elapsed) and elapsed[1] <= saved < elapsed[2]
    assert manifest["wall_time_total_s"] == pytest.approx(manifest["wall_time_s"] + saved, abs=0.5)
    # the checkpoint's training record: the counters and the clock of its step
    record = checkpoint_compute(tmp_path / "stopped" / "checkpoint-2")
    assert (record["stage"], record["step"], record["optimizer_steps"], record["wall_s"]) == ("onpolicy", 2, 2, saved)
    assert 0 < record["rollout_tokens"] < manifest["counts"]["rollout_tokens"]
    assert record["started_from"] == manifest["inputs"]["student"] and record["machine"] == manifest["machine"]


TWO_PROCESS_RUN = """
import os, signal, sys
import llmdistill.onpolicy as op
from llmdistill.config.onpolicy import OnPolicyConfig
from llmdistill.log import setup_logging
real = op.train_step
def step_then_term(step, *args, **kwargs):
    stats = real(step, *args, **kwargs)
    if step == 1 and os.environ["RANK"] == "1" and os.environ.get("TERM_AT_STEP_2"):  # only rank 1 is signalled
        os.kill(os.getpid(), signal.SIGTERM)
    return stats
op.train_step = step_then_term
setup_logging()  # as the llmdistill command: INFO on rank 0, WARNING on the others
op.run_onpolicy(OnPolicyConfig(**__import__("json").loads(sys.argv[1])))
"""


def launch_two(cfg: OnPolicyConfig, tmp_path: Path, term: bool = False) -> subprocess.CompletedProcess:
    """:data:`TWO_PROCESS_RUN` of ``cfg`` in 2 CPU processes under ``accelerate launch`` (DDP config, gloo)."""
    from conftest import accelerate_launch

    script = tmp_path / "two.py"
    script.write_text(textwrap.dedent(TWO_PROCESS_RUN))
    fields = {k: v for k, v in cfg.__dict__.items() if not k.startswith("_")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM_AT_STEP_2": "1" if term else ""}
    return subprocess.run(accelerate_launch(str(script), json.dumps(fields)), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.integration
def test_two_processes_take_the_same_steps_as_one(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path):
    """Data-parallel on-policy distillation: 2 processes each sample, score and back-propagate half of every
    step's prompts, the gradients are summed, and the run equals one process doing whole steps (greedy
    rollouts: the same completions either way), in weights, logged loss and counted tokens."""
    from llmdistill.onpolicy import run_onpolicy

    common = dict(rollout_backend="transformers", rollout_temperature=0.0, max_steps=3, max_new_tokens=16,
                  prompts_per_step=4, micro_batch_tokens=48)  # micro-batches differ in number between the processes
    one = run_onpolicy(config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "one", **common))
    done = launch_two(config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "two", **common), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert two["counts"] == one["counts"] and one["counts"]["rollout_tokens"] > 0
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    base = load_file(str(Path(tiny_student_dir) / "model.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    assert max(float((a[k] - base[k]).abs().max()) for k in a) > 1e-3  # trained: the steps moved the weights
    logs = [json.loads((tmp_path / d / "log_history.json").read_text()) for d in ("one", "two")]
    for key in ("loss", "reverse_kl", "completion_tokens"):
        assert [h[key] for h in logs[0]] == pytest.approx([h[key] for h in logs[1]], rel=1e-4), key
    assert (done.stdout + done.stderr).count("step 3:") == 1  # one log: the main process's


@pytest.mark.integration
def test_a_sigterm_to_one_of_two_processes_stops_both_and_the_resume_is_exact(
        prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path):
    """Sampled rollouts (each process its own generator, every one of them checkpointed): only rank 1 gets
    SIGTERM in step 2; both stop after it with one checkpoint, and the resumed run ends bit-identical to
    an uninterrupted 2-process run."""
    common = dict(rollout_backend="transformers", max_steps=4, max_new_tokens=16, prompts_per_step=4)
    whole = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "whole", **common)
    assert launch_two(whole, tmp_path).returncode == 0
    stopped = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "stopped", **common)
    done = launch_two(stopped, tmp_path, term=True)
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0 and said.count("stopped by SIGTERM after step 2 of 4") == 2, said[-3000:]  # each rank
    assert sorted(p.name for p in (tmp_path / "stopped").glob("checkpoint-*")) == ["checkpoint-2"]
    assert (tmp_path / "stopped" / "checkpoint-2" / "rng-1.pt").is_file()
    done = launch_two(OnPolicyConfig(**{**stopped.__dict__, "resume_from_checkpoint": "latest"}), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((tmp_path / "stopped" / "log_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]


@pytest.mark.integration
def test_two_processes_each_sample_with_their_own_engine_and_lora_adapter(prompts, tiny_student_dir,
                                                                          tiny_random_teacher_dir, tmp_path):
    """In-process vLLM rollouts in 2 processes, a LoRA student synced as vLLM LoRA adapters: each process's
    engine loads its own adapter copies (no shared sync directory), both shares are trained and counted,
    and the sync files are gone at the end."""
    cfg = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "two", rollout_backend="vllm",
                 use_peft=True, lora_r=4, lora_rollouts="adapter", max_steps=2, save_steps=1, kv_cache_space_gb=1)
    done = launch_two(cfg, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["optimizer_steps"] == 2 and counts["trained_tokens"] == counts["rollout_tokens"] > 0
    assert (tmp_path / "two" / "checkpoint-1" / "rng-1.pt").is_file()
    assert not any((tmp_path / "two" / "rollout-weights").rglob("*.safetensors"))


@pytest.mark.unit
def test_a_sharded_launch_and_steps_that_do_not_divide_fail_in_one_line(prompts, tmp_path, monkeypatch):
    from llmdistill.distributed import Ranks
    from llmdistill.onpolicy import check_inputs

    cfg = config(prompts, tmp_path, tmp_path, tmp_path / "out", prompts_per_step=6)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="replicated student.*not with DeepSpeed.*use_peft"):
        check_inputs(cfg)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    with pytest.raises(ConfigError, match="prompts_per_step=6 does not divide among the 4 processes"):
        check_inputs(cfg, Ranks(rank=1, world=4))
    assert Ranks(rank=1, world=3).share(list(range(6))) == [2, 3]
    from llmdistill.plan import make_plan  # the dry run refuses what the launched run would

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="prompts_per_step=6 does not divide among the 4 processes"):
        make_plan("onpolicy", cfg)
    # the in-process engines leave room for the student on its GPU
    with pytest.raises(ConfigError, match=r"take 1.10 of the GPU \(2 x teacher_gpu_memory_utilization 0.4 \+ "
                                          r"gpu_memory_utilization 0.3 \(the rollout engine\)\)"):
        OnPolicyConfig(dataset="p", student_model="s", teacher_model="a=x,b=y", teacher_column="domain",
                       teacher_backend="vllm", teacher_gpu_memory_utilization=0.4, gpu_memory_utilization=0.3)


@pytest.mark.unit
def test_an_output_dir_with_an_earlier_run_is_refused_resumed_or_cleared(prompts, tiny_student_dir, tmp_path,
                                                                          monkeypatch):
    """A fresh run never mixes with what an earlier one left: `latest` would later resume from the
    earlier run's newest checkpoint, its weights and its prompt position."""
    from llmdistill.onpolicy import check_inputs, clear_earlier_run

    out = tmp_path / "out"
    for step in (5, 10):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "state.json").write_text("{}")
    (out / ".checkpoint-15.tmp").mkdir()
    cfg = config(prompts, tiny_student_dir, tiny_student_dir, out)
    with pytest.raises(ConfigError, match=r"holds checkpoints of an earlier run \(the newest checkpoint-10\): resume "
                                          "it with resume_from_checkpoint: latest, or set overwrite: true"):
        check_inputs(cfg)
    check_inputs(config(prompts, tiny_student_dir, tiny_student_dir, out, resume_from_checkpoint="latest"))
    check_inputs(config(prompts, tiny_student_dir, tiny_student_dir, out, overwrite=True))

    (out / "manifest.json").write_text('{"stage": "onpolicy"}')
    with pytest.raises(ConfigError, match="holds a finished run: set overwrite: true"):
        check_inputs(cfg)
    monkeypatch.setattr(op, "load_student", lambda *a: pytest.fail("a finished run was trained again"))
    resumed = op.run_onpolicy(config(prompts, tiny_student_dir, tiny_student_dir, out, resume_from_checkpoint="latest"))
    assert resumed == {"stage": "onpolicy"}  # a requeued job of a finished run: nothing to do

    clear_earlier_run(out, checkpoints=False)  # overwrite with a resume: the checkpoints stay
    assert sorted(p.name for p in out.iterdir()) == [".checkpoint-15.tmp", "checkpoint-10", "checkpoint-5"]
    clear_earlier_run(out, checkpoints=True)
    assert list(out.iterdir()) == []


@pytest.mark.integration
def test_the_cli_runs_and_records_the_compute(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path):
    out = tmp_path / "cli"
    run_cli("onpolicy", "--dataset", str(prompts), "--student_model", str(tiny_student_dir),
            "--teacher_model", str(tiny_random_teacher_dir), "--output_dir", str(out), "--max_steps", "2",
            "--prompts_per_step", "4", "--max_new_tokens", "16", "--max_model_len", "256", "--logging_steps", "1",
            "--teacher_backend", "vllm")  # two engines in the process: the rollouts' and the teacher's
    manifest = json.loads((out / "manifest.json").read_text())
    counts, seconds = manifest["counts"], manifest["compute"]["seconds"]
    assert counts["optimizer_steps"] == 2 and counts["rollout_tokens"] > 0
    assert counts["teacher_tokens_scored"] > counts["trained_tokens"] == counts["rollout_tokens"]
    assert set(seconds) == {"rollout", "scoring", "training", "sync"} and all(v > 0 for v in seconds.values())
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2] and "reverse_kl" in history[0]
    # logged_at: when the run reached the step, within the stage's wall time (the demo's curves place checkpoints by it)
    start = manifest["started_at"]
    assert start < history[0]["logged_at"] < history[1]["logged_at"] <= start + manifest["wall_time_s"]


# ---- GKD's lambda: offline built batches ------------------------------------------------------


def _dense_topk_reverse_kl(student, batch) -> torch.Tensor:
    """Per-token mean KL(student || teacher) on the teacher's top-k + tail bucket, from full-vocabulary
    logits in float64, by the formulas of llmdistill.losses (teacher floored at TEACHER_PROB_FLOOR)."""
    with torch.no_grad():
        hidden = student.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               use_cache=False).last_hidden_state[0]
        s = torch.log_softmax(student.lm_head(hidden[batch["target_index"] - 1]).double(), -1)
    top = s.gather(-1, batch["teacher_ids"])
    rest = s.scatter(-1, batch["teacher_ids"], float("-inf")).logsumexp(-1, keepdim=True)
    t_top = batch["teacher_logprobs"].double()
    t_rest = torch.log((1 - t_top.exp().sum(-1, keepdim=True)).clamp(min=0))
    p = torch.cat([top, rest], -1)
    q = torch.cat([t_top, t_rest], -1).clamp(min=float(np.log(TEACHER_PROB_FLOOR)))
    return (p.exp() * (p - q)).sum(-1).mean()


@pytest.mark.integration
def test_a_mixed_run_trains_on_offline_batches_on_exactly_the_seeded_steps(
        prompts, built, tiny_student_dir, tiny_random_teacher_dir, tmp_path, monkeypatch):
    """lambda = 0.5: the seed's steps take an offline batch (no rollout, no scoring) whose loss is reverse KL on it."""
    cfg = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "mix", rollout_backend="transformers",
                 on_policy_fraction=0.5, offline_data_dir=str(built), offline_rows_per_step=2, max_steps=6,
                 max_new_tokens=16)
    expected = offline_steps(cfg.seed, 0.5, 6)
    assert expected.any() and not expected.all()
    rollout_steps, offline_batches, weights = [], {}, []
    real_rollout, real_batch, real_loss = op.rollout, op.OfflineBatches.batch, op.onpolicy_loss

    def spy_rollout(engine, stream, steps, *args):
        rollout_steps.extend(steps)  # one step a rollout (steps_per_rollout 1)
        assert len(steps) == 1
        return real_rollout(engine, stream, steps, *args)

    def spy_batch(self, step):
        offline_batches[step] = (real_batch(self, step), self.row_indices(step))
        return offline_batches[step][0]

    def spy_loss(model, batch, cfg, *args, **kwargs):
        if "teacher_token_logprobs" not in batch:  # an offline batch: keep the weights it is computed with
            weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_loss(model, batch, cfg, *args, **kwargs)

    monkeypatch.setattr(op, "rollout", spy_rollout)
    monkeypatch.setattr(op.OfflineBatches, "batch", spy_batch)
    monkeypatch.setattr(op, "onpolicy_loss", spy_loss)
    import transformers

    loads, real_tokenizer = [], transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda path, *a, **k: loads.append(str(path)) or real_tokenizer(path, *a, **k))
    counts = op.run_onpolicy(cfg)["counts"]
    assert loads.count(str(tiny_student_dir)) == 1  # the input, prompt and offline checks and the student share one

    assert sorted(offline_batches) == [s for s in range(6) if expected[s]]
    assert rollout_steps == [s for s in range(6) if not expected[s]]
    assert counts["offline_steps"] == int(expected.sum()) and counts["optimizer_steps"] == 6
    offline_targets = sum(len(b["target_index"]) for b, _ in offline_batches.values())
    assert counts["trained_tokens"] == offline_targets + counts["rollout_tokens"]
    history = json.loads((tmp_path / "mix" / "log_history.json").read_text())
    assert [h["offline"] for h in history] == [float(x) for x in expected]

    # the batches: consecutive positions of one seeded row order, collated from the rows read_built reads
    table, meta = read_built(built)
    rows = table.to_pylist()
    collate = DistillCollator(k=meta["k"], vocab_size=meta["vocab_size"], codec_bits=meta["codec_bits"], with_topk=True)
    used = [i for s in sorted(offline_batches) for i in offline_batches[s][1]]
    assert len(set(used)) == len(used) == 2 * int(expected.sum())
    fresh = op.OfflineBatches(cfg)  # a resumed run: by step index alone
    last = max(offline_batches)
    assert fresh.row_indices(last) == offline_batches[last][1]
    for batch, indices in offline_batches.values():
        ref = collate([rows[i] for i in indices])
        for key in ("input_ids", "position_ids", "target_index", "teacher_ids", "teacher_logprobs"):
            assert torch.equal(batch[key], ref[key]), key

    # each offline step's loss is reverse KL on its batch with the weights of that step
    student, _ = load_student(str(tiny_student_dir))
    for step, state in zip(sorted(offline_batches), weights, strict=True):
        student.load_state_dict(state)
        direct = float(_dense_topk_reverse_kl(student, offline_batches[step][0]))
        # the run's loss is fp32 arithmetic on O(1) log-probabilities, the reference float64: they may differ
        # by a few fp32 ulps of those (~1e-7 absolute; 2e-8 seen on an AVX2 CPU), while one step's update
        # moves this loss by ~1e-4 and another batch by more
        assert history[step]["loss"] == pytest.approx(direct, rel=1e-5, abs=1e-7)


def stop_after_checkpoint_2_then_resume(stopped: OnPolicyConfig, monkeypatch, **changes) -> dict:
    """Run ``stopped`` until checkpoint-2 is saved (then an interrupt), and resume it to the end with
    ``changes``; the resumed run's manifest."""
    real = op.save_checkpoint

    def save_then_stop(*args, **kwargs):
        path = real(*args, **kwargs)
        if path.name == "checkpoint-2":
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(op, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        op.run_onpolicy(stopped)
    monkeypatch.setattr(op, "save_checkpoint", real)
    return op.run_onpolicy(OnPolicyConfig(**{**stopped.__dict__, "resume_from_checkpoint": "latest", **changes}))


def same_weights(a: Path, b: Path) -> bool:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.integration
def test_a_mixed_run_resumes_with_the_same_step_choices_and_offline_rows(
        prompts, built, tiny_student_dir, tiny_random_teacher_dir, tmp_path, monkeypatch):
    """Stopped after checkpoint-2 and resumed, a lambda = 0.5 run ends bit-identical to an uninterrupted one."""
    common = dict(rollout_backend="transformers", on_policy_fraction=0.5, offline_data_dir=str(built),
                  offline_rows_per_step=2, max_steps=6, save_steps=2, max_new_tokens=12, seed=0)
    assert offline_steps(0, 0.5, 6)[2:].any() and not offline_steps(0, 0.5, 6)[2:].all()  # both kinds after the stop
    whole = op.run_onpolicy(config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "whole", **common))
    stopped = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "stopped", **common)
    resumed = stop_after_checkpoint_2_then_resume(stopped, monkeypatch)
    assert same_weights(tmp_path / "whole", tmp_path / "stopped")
    assert resumed["counts"] == whole["counts"]


@pytest.mark.integration
def test_a_resume_continues_the_samples_when_starting_an_engine_reseeds(
        prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path, monkeypatch):
    """An in-process vLLM engine seeds the global generators as it starts (its worker's
    ``set_random_seed``), and its sampler draws from torch's. Here the rollout engine does the same:
    a run stopped after checkpoint-2 and resumed still ends bit-identical to an uninterrupted one,
    because the checkpoint's RNG states are set after the engines are built."""

    class Reseeding(op.TransformersRollout):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            torch.manual_seed(0), random.seed(0), np.random.seed(0)  # as vLLM's worker does at start

    monkeypatch.setattr(op, "TransformersRollout", Reseeding)
    common = dict(rollout_backend="transformers", max_steps=4, save_steps=2, max_new_tokens=12, seed=0)
    op.run_onpolicy(config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "whole", **common))
    stopped = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "stopped", **common)
    stop_after_checkpoint_2_then_resume(stopped, monkeypatch)
    assert same_weights(tmp_path / "whole", tmp_path / "stopped")


@pytest.mark.integration
def test_a_mixed_run_resumed_with_other_batch_sizes_reads_on_where_it_stopped(
        prompts, built, tiny_student_dir, tiny_random_teacher_dir, tmp_path, monkeypatch):
    """Stopped after checkpoint-2 and resumed with 2 prompts a step instead of 4 and 3 offline rows
    instead of 2: over both runs the prompts and the rows are consecutive positions of their seeded
    orders (none twice, none skipped)."""
    common = dict(rollout_backend="transformers", on_policy_fraction=0.5, offline_data_dir=str(built),
                  offline_rows_per_step=2, max_steps=6, save_steps=2, max_new_tokens=8, seed=0)
    chosen = offline_steps(0, 0.5, 6)
    assert chosen[:2].any() and not chosen[:2].all() and chosen[2:].any() and not chosen[2:].all()
    read_prompts, read_rows = [], []
    real_rollout, real_rows = op.rollout, op.OfflineBatches.row_indices

    def spy_rollout(engine, stream, steps, *args):
        read_prompts.extend(i for step in steps for i in stream.batch(step))
        return real_rollout(engine, stream, steps, *args)

    def spy_rows(self, step):
        read_rows.extend(real_rows(self, step))
        return read_rows[-self.cursor.size:]

    monkeypatch.setattr(op, "rollout", spy_rollout)
    monkeypatch.setattr(op.OfflineBatches, "row_indices", spy_rows)
    stopped = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "stopped", **common)
    stop_after_checkpoint_2_then_resume(stopped, monkeypatch, prompts_per_step=4 // 2, offline_rows_per_step=3)
    state = json.loads((tmp_path / "stopped" / "checkpoint-2" / "state.json").read_text())
    assert state["streams"] == {"prompts_per_step": 4, "prompt_position": 4 * int((~chosen[:2]).sum()),
                                "offline_rows_per_step": 2, "offline_position": 2 * int(chosen[:2].sum())}
    assert len(read_prompts) == 4 * int((~chosen[:2]).sum()) + 2 * int((~chosen[2:]).sum())
    assert read_prompts == op.seeded_slice(40, [0], 0, len(read_prompts))
    assert len(read_rows) == 2 * int(chosen[:2].sum()) + 3 * int(chosen[2:].sum())
    assert read_rows == op.seeded_slice(len(read_built(built)[0]), [0, *op.OFFLINE_ROWS_KEY], 0, len(read_rows))


@pytest.mark.integration
def test_pure_offline_kd_never_samples_nor_asks_a_teacher(built, tiny_student_dir, tmp_path, monkeypatch):
    forbid(monkeypatch, op, ("VllmRollout", "TransformersRollout", "rollout", "load_teachers", "score"),
           "on_policy_fraction 0 must not sample or score")
    cfg = OnPolicyConfig(student_model=str(tiny_student_dir), output_dir=str(tmp_path / "off"), on_policy_fraction=0.0,
                         offline_data_dir=str(built), offline_rows_per_step=2, max_steps=3, learning_rate=1e-3,
                         logging_steps=1)
    counts = op.run_onpolicy(cfg)["counts"]
    assert counts["optimizer_steps"] == counts["offline_steps"] == 3 and counts["trained_tokens"] > 0
    assert counts["rollout_tokens"] == counts["teacher_tokens_scored"] == 0
    before, after = load_file(str(tiny_student_dir / "model.safetensors")), load_file(str(tmp_path / "off" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_offline_rows_of_another_tokenizer_fail_before_a_model_loads(built, tiny_student_dir, tmp_path, monkeypatch):
    """The built rows index the vocabulary they were built with: a student with another tokenizer is
    refused in one line by the input checks, before the student, teachers or shards are loaded."""
    forbid(monkeypatch, op, ("load_student", "load_teachers", "convert_built_to_arrow"), "loaded before the check")
    other = with_another_tokenizer(tiny_student_dir, tmp_path / "other-student")
    cfg = OnPolicyConfig(student_model=str(other), output_dir=str(tmp_path / "off"), on_policy_fraction=0.0,
                         offline_data_dir=str(built), max_steps=3)
    with pytest.raises(ConfigError, match=f"offline_data_dir: the tokenizer of student {other} .* is not the one"):
        op.run_onpolicy(cfg)
    assert not (tmp_path / "off").exists()


def test_a_teacher_of_another_tokenizer_fails_before_a_model_loads(prompts, tiny_student_dir, tiny_random_teacher_dir,
                                                                    tmp_path, monkeypatch):
    """Grades of token ids that name other strings are no grades: a teacher whose tokenizer is not
    the student's is refused in one line, naming it, before any model loads."""
    forbid(monkeypatch, op, ("load_student", "load_teachers", "VllmRollout", "TransformersRollout"),
           "a model loaded before the tokenizer check")
    other = with_another_tokenizer(tiny_random_teacher_dir, tmp_path / "other-teacher")
    cfg = config(prompts, tiny_student_dir, other, tmp_path / "out", rollout_backend="transformers")
    with pytest.raises(UserError, match=rf"^teacher 'default' {other}: its tokenizer differs from the student's "
                                        rf"\({tiny_student_dir}\); token-level distillation needs one vocabulary"):
        op.run_onpolicy(cfg)


@pytest.mark.integration
def test_a_teacher_with_padding_rows_grades_with_the_students_ids(prompts, tiny_student_dir, tiny_random_teacher_dir,
                                                                  tmp_path, monkeypatch):
    """A teacher of the student's tokenizer with 8 LM-head rows more (Qwen2.5 7B+ over 0.5B-3B), rows
    that would win its top-k: the grades name only ids the student has."""
    import shutil

    from transformers import AutoModelForCausalLM

    teacher_dir = tmp_path / "padded"
    shutil.copytree(tiny_random_teacher_dir, teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    rows = teacher.get_output_embeddings().weight.shape[0]
    teacher.resize_token_embeddings(rows + 8, mean_resizing=False)
    with torch.no_grad():
        teacher.get_output_embeddings().weight[rows:] = 50 * teacher.get_output_embeddings().weight[:rows].abs().max()
    teacher.save_pretrained(str(teacher_dir))
    graded, real = [], op.score

    def spy(teachers, rollouts, cfg):
        graded.append((rollouts, real(teachers, rollouts, cfg)))
        return graded[-1][1]

    monkeypatch.setattr(op, "score", spy)
    cfg = config(prompts, tiny_student_dir, teacher_dir, tmp_path / "out", rollout_backend="transformers",
                 max_steps=1, max_new_tokens=8)
    op.run_onpolicy(cfg)
    rollouts, grades = graded[0]
    # the reference: the padded teacher's forward of each sample, its top-k among the student's ids,
    # log-probs normalised over all of its rows
    padding_mass, offset = [], 0
    for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True):
        with torch.no_grad():
            every = torch.log_softmax(teacher(torch.tensor([p + c])).logits[0, len(p) - 1:-1].double(), -1)
        best = every[:, :rows].topk(cfg.logprobs_top_k, -1)
        span = slice(offset, offset + len(c))
        assert grades["teacher_ids"][span].tolist() == best.indices.tolist()
        torch.testing.assert_close(grades["teacher_logprobs"][span].double(), best.values, rtol=0, atol=1e-4)
        padding_mass.append(every[:, rows:].exp().sum(-1))
        offset += len(c)
    assert offset == len(grades["teacher_ids"]) > 0
    assert bool((torch.cat(padding_mass) > 0.5).any())  # the padding rows would have won these top-k


# ---- the teacher on a pool of vLLM servers --------------------------------------------------------


@pytest.mark.unit
def test_a_teacher_on_servers_grades_exactly_what_the_servers_score(synthetic_servers):
    """Each sample's grades are the server's prompt log-probs at its completion positions; routing by teacher."""
    from llmdistill.generate.synthetic_server import scored_arrays

    math, code = synthetic_servers(model="math-teacher"), synthetic_servers(model="code-teacher")
    cfg = OnPolicyConfig(dataset="p.jsonl", student_model="s", teacher_model="math=math-teacher,code=code-teacher",
                         teacher_column="domain", teacher_backend="server", logprobs_top_k=5,
                         teacher_urls=[f"math={math.url}", f"code={code.url}"])
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14], [40, 41]]
    completions = [[20, 21, 22, 23], [], [30, 31], [151_000, 7, 8]]
    rollouts = op.Rollouts(prompt_ids=prompts, completion_ids=completions, records=[{}] * 4,
                           teachers=["math", "code", "code", "math"])
    graded = score(op.load_teachers(cfg), rollouts, cfg)
    assert graded["teacher_ids"].dtype == torch.long and graded["teacher_logprobs"].dtype == torch.float32
    row = 0
    for p, c in zip(prompts, completions, strict=True):
        # one row per position after the first; asked for 13 (vLLM's default cap of 20 allows 8 beyond k), the
        # teacher keeps the 5 best
        _, ids, lps, own = scored_arrays(p + c, 13)
        rows = slice(row, row + len(c))
        assert graded["teacher_ids"][rows].tolist() == ids[len(p) - 1:, :5].tolist()
        assert np.array_equal(graded["teacher_logprobs"][rows].numpy(), lps[len(p) - 1:, :5])
        assert np.array_equal(graded["teacher_token_logprobs"][rows].numpy(), own[len(p) - 1:])
        row += len(c)
    assert row == len(graded["target_ids"])
    assert (math.requests, code.requests) == (2, 1)  # one request per sample with tokens, to its own teacher


@pytest.mark.unit
def test_a_teacher_on_servers_grades_only_ids_the_student_has(synthetic_servers):
    """A teacher with more LM-head rows than the student (Qwen2.5 7B over 1.5B): the servers rank every
    row; asked for 8 more entries than k (their --max-logprobs allows 13), the grades are the 5 best of
    the student's ids as served, and only a position with fewer than 5 of them ends in -inf entries."""
    from types import SimpleNamespace

    from llmdistill.generate.synthetic_server import scored_arrays

    server = synthetic_servers(model="t")
    cfg = OnPolicyConfig(dataset="p.jsonl", student_model="s", teacher_model="t", teacher_backend="server",
                         logprobs_top_k=5, teacher_urls=[server.url], teacher_max_logprobs=13)
    prompts, completions = [[5, 6, 7], [11, 12, 13, 14]], [[20, 21, 22, 23, 24, 25], [30, 31, 32]]
    _, ids, lps, own = zip(*(scored_arrays(p + c, 13) for p, c in zip(prompts, completions, strict=True)), strict=True)
    served_ids = np.concatenate([i[len(p) - 1:] for i, p in zip(ids, prompts, strict=True)])
    served_lps = np.concatenate([x[len(p) - 1:] for x, p in zip(lps, prompts, strict=True)])
    rows = int(np.median(served_ids))  # about half the served entries lie past the student's rows
    teachers = op.load_teachers(cfg)
    student = SimpleNamespace(get_output_embeddings=lambda: SimpleNamespace(weight=torch.empty(rows, 0)))
    for teacher in teachers.values():
        teacher.grade_for(student)
    graded = score(teachers, op.Rollouts(prompt_ids=prompts, completion_ids=completions, records=[{}] * 2,
                                         teachers=["default"] * 2), cfg)
    got_ids, got_lps = graded["teacher_ids"].numpy(), graded["teacher_logprobs"].numpy()
    assert got_ids.shape == (9, 5) and (got_ids < rows).all()
    assert ((served_ids[:, :5] >= rows).any(axis=1)).sum() >= 3  # the top-5 served held ids past the student's
    short = moved = 0
    for served_i, served_l, i, lp in zip(served_ids, served_lps, got_ids, got_lps, strict=True):
        known = served_i < rows
        n = min(5, int(known.sum()))
        short, moved = short + (n < 5), moved + (n == 5 and not known[:5].all())
        assert i[:n].tolist() == served_i[known][:n].tolist() and np.array_equal(lp[:n], served_l[known][:n])
        assert np.isneginf(lp[n:]).all() and len(set(i.tolist())) == 5
    assert short < 9 and moved > 0, (short, moved)
    assert np.array_equal(graded["teacher_token_logprobs"].numpy(),
                          np.concatenate([x[len(p) - 1:] for x, p in zip(own, prompts, strict=True)]))


@pytest.mark.unit
def test_an_unreachable_teacher_server_fails_in_one_line_before_a_model_loads(prompts, tmp_path, monkeypatch):
    import re
    import socket
    import time

    from llmdistill.cli import one_line
    from llmdistill.generate.pool import ServerError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(op, "load_student", lambda *a: pytest.fail("a model loaded before the servers answered"))
    cfg = OnPolicyConfig(dataset=str(prompts), student_model=str(tmp_path), teacher_model="served-teacher",
                         teacher_backend="server", teacher_urls=[f"http://127.0.0.1:{port}"], teacher_timeout=1.0,
                         output_dir=str(tmp_path / "out"))
    started = time.monotonic()
    with pytest.raises(ServerError) as err:
        op.run_onpolicy(cfg)
    assert time.monotonic() - started < 10 and not (tmp_path / "out").exists()
    assert one_line(err.value) == str(err.value)
    assert re.fullmatch(rf"teacher 'served-teacher': no server of \['http://127.0.0.1:{port}'\] answered /health "
                        r"within 1s \(teacher_timeout\); start the teacher servers or fix teacher_urls", str(err.value))


# ---- the real recipe ------------------------------------------------------------------------------


@pytest.mark.unit
def test_the_recipe_dry_runs_with_tokens_and_gpus_per_step():
    recipe = ROOT / "configs" / "recipes" / "r1-qwen7b" / "onpolicy.yaml"

    def dry_run(*overrides: str, processes: int = 2) -> str:  # WORLD_SIZE: the training processes of the launch
        res = subprocess.run([sys.executable, "-m", "llmdistill", "onpolicy", "--config", str(recipe), "--dry_run",
                              *overrides], capture_output=True, text=True, cwd=ROOT, timeout=120,
                             env={**os.environ, "COLUMNS": "250", "WORLD_SIZE": str(processes)})
        assert res.returncode == 0, res.stderr[-3000:]
        return " ".join(res.stdout.split())

    text = dry_run()
    for needle in ("150: 150 on-policy, 0 on offline batches", "512 prompts x 4 samples = 2048",
                   "rollout tokens per step (upper bound) │ 33554432",
                   "GPUs: training │ 2: 2 training processes (256 prompts of each step each), data-parallel",
                   "GPUs: rollouts │ 2 vLLM server(s) x 1 = 2", "GPUs: teacher scoring │ 2 vLLM server(s) x 2 = 4",
                   "GPUs in all │ 8", "the LoRA adapter loaded as a vLLM LoRA at each sync",
                   "student weights (bf16, frozen) + LoRA adapter │ 13 GiB + the rank-128 adapter's",
                   "in each training process (replicated: data-parallel, not sharded)",
                   "each layer's recomputed in the backward (gradient checkpointing)"):
        assert needle in text, (needle, text[-3000:])
    alone = dry_run(processes=1)
    assert "GPUs: training │ 1: one training process" in alone and "GPUs in all │ 7" in alone
    # full fine-tuning of the same student: the size that needs sharding; two steps' prompts per rollout
    full = dry_run("--use_peft", "false", "--steps_per_rollout", "2")
    assert "student weights + grads + AdamW (fp32) │ 104 GiB" in full
    assert "the prompts of 2 steps sampled in one batch (4096 samples), then trained a step at a time" in full
    assert "steps sampled in one batch" not in text
    assert not (ROOT / "runs" / "r1-qwen7b").exists(), "a dry run must write nothing"


class _EchoTeacher:
    """A teacher whose grade of each completion token is that token's id (as its own log-prob and its
    top-k), and which records how many samples each call graded."""

    def __init__(self):
        self.calls = []

    def score(self, batch, k, chunk_size):
        self.calls.append(int(batch["seq_of_target"].unique().numel()))
        ids = batch["target_ids"]
        return {"teacher_ids": ids[:, None].repeat(1, k), "teacher_logprobs": ids[:, None].repeat(1, k).float(),
                "teacher_token_logprobs": ids.float()}


class _VersionedEngine:
    """A rollout engine that records which weights (the model's ``version``) sampled each batch, and
    fails if weights are synced while a batch is being sampled."""

    def __init__(self):
        import threading

        self.version, self.synced_step, self.sampling, self.calls = 0, 0, False, []
        self.lock = threading.Lock()

    def sample(self, prompt_ids, cfg):
        import time

        with self.lock:
            self.sampling = True
            version = self.version
        time.sleep(0.02)  # long enough for the trainer to reach its next sync if it did not wait
        self.calls.append(("sample", version))
        with self.lock:
            self.sampling = False
        return [list(p) for p in prompt_ids for _ in range(cfg.samples_per_prompt)]  # each prompt echoed

    def sync(self, model):
        with self.lock:
            assert not self.sampling, "weights synced while a batch was being sampled"
            self.version = model.version
        self.calls.append(("sync", model.version))

    def sleep(self):
        pass

    def wake(self, model, sync):
        if sync:
            self.sync(model)


@pytest.mark.unit
@pytest.mark.parametrize("async_rollouts,sync_every,k,offline_at,lags,sampled_by", [
    (False, 1, 1, (), [0, 0, 0, 0, 0], [0, 1, 2, 3, 4]),
    (False, 2, 1, (), [0, 1, 0, 1, 0], [0, 0, 2, 2, 4]),
    (True, 1, 1, (), [0, 1, 1, 1, 1], [0, 0, 1, 2, 3]),
    (True, 2, 1, (), [0, 1, 2, 1, 2], [0, 0, 0, 2, 2]),
    (True, 1, 1, (2,), [0, 1, None, 0, 1], [0, 0, 3, 3]),  # after an offline step: sampled fresh, not 2 updates old
    # steps_per_rollout 2: steps 0-1, 2-3 and 4 sampled in one batch each
    (False, 1, 2, (), [0, 1, 0, 1, 0], [0, 2, 4]),
    (False, 4, 2, (), [0, 1, 2, 3, 0], [0, 0, 4]),
    (False, 1, 2, (1,), [0, None, 0, 1, 0], [0, 2, 4]),  # step 0's batch holds its prompts only
    (True, 1, 2, (), [0, 1, 2, 3, 2], [0, 0, 2]),  # the next group is sampled while this one trains
    (True, 1, 2, (2,), [0, 1, None, 0, 1], [0, 3, 3]),  # group 2-3 starts offline: step 3 samples when it starts
], ids=["sync", "sync-every-2", "async", "async-every-2", "async-offline", "groups", "groups-sync-every-4",
        "groups-offline", "groups-async", "groups-async-offline"])
def test_rollouts_come_from_the_weights_the_schedule_promises(async_rollouts, sync_every, k, offline_at, lags,
                                                              sampled_by, tiny_tokenizer):
    """Which weights sample each step's batch (by the number of updates behind them), synchronous or
    async, in groups of ``steps_per_rollout``; that the engine never gets weights while it samples; that
    each step trains on its own prompts of the prompt stream, each with its own completion; and that
    a group's samples are graded in one teacher call, each step getting its own samples' grades."""
    from llmdistill.onpolicy import Counters, RolloutSource
    from llmdistill.prompts import PromptFormat

    steps = len(lags)
    cfg = OnPolicyConfig(dataset="p", student_model="s", teacher_model="t", rollout_backend="server",
                         rollout_urls=["http://x"], async_rollouts=async_rollouts, sync_every=sync_every,
                         steps_per_rollout=k, prompts_per_step=2, max_steps=steps)
    table = PromptTable.from_rows([{"id": str(i), "prompt": f"question {i}"} for i in range(8)])
    stream = PromptStream(table, 0, Cursor(2))
    engine, model = _VersionedEngine(), types.SimpleNamespace(version=0)
    offline = types.SimpleNamespace(takes=lambda step: step in offline_at)
    teacher = _EchoTeacher()
    source = RolloutSource(engine, {"default": teacher}, stream, PromptFormat(), tiny_tokenizer, cfg, Counters(), offline)
    seen = []
    for step in range(steps):  # as train_step: take the rollouts (unless offline), update, then `updated`
        if step in offline_at:
            seen.append(None)
        else:
            rollouts, batch = source.take(step, model)
            seen.append(step - rollouts.policy_step)
            assert [r["id"] for r in rollouts.records] == [str(i) for i in stream.batch(step)]
            assert rollouts.completion_ids == rollouts.prompt_ids
            own = pack(rollouts.prompt_ids, rollouts.completion_ids)["target_ids"]
            assert torch.equal(batch["target_ids"], own) and torch.equal(batch["teacher_token_logprobs"], own.float())
        model.version += 1
        source.updated(step, model)
    assert seen == lags
    assert [v for call, v in engine.calls if call == "sample"] == sampled_by
    assert len(teacher.calls) == len(sampled_by)  # one grading per sampled batch, of all its samples
    assert sum(teacher.calls) == 2 * sum(x is not None for x in seen)


@pytest.mark.unit
def test_one_rollout_of_several_steps_gives_each_step_its_own_samples_and_teachers(tiny_tokenizer):
    """Two steps sampled in one batch, 2 samples per prompt, a teacher per prompt: each step's
    samples are its own prompts', each prompt's two completions beside it, routed to its teacher."""
    from llmdistill.onpolicy import rollout
    from llmdistill.prompts import PromptFormat

    cfg = OnPolicyConfig(dataset="p", student_model="s", teacher_model="a=x,b=y", teacher_column="domain",
                         prompts_per_step=3, samples_per_prompt=2, steps_per_rollout=2)
    table = PromptTable.from_rows([{"id": str(i), "prompt": f"question {i}", "domain": "ab"[i % 2]} for i in range(8)])
    stream, engine = PromptStream(table, 0, Cursor(3)), _VersionedEngine()
    batches = rollout(engine, stream, [4, 5], PromptFormat(), tiny_tokenizer, cfg)
    assert len(batches) == 2 and [call for call, _ in engine.calls] == ["sample"]  # one sampling for both
    for step, batch in zip([4, 5], batches, strict=True):
        ids = [str(i) for i in stream.batch(step) for _ in range(2)]
        assert [r["id"] for r in batch.records] == ids
        assert batch.teachers == ["ab"[int(i) % 2] for i in ids]
        assert batch.completion_ids == batch.prompt_ids  # the engine echoes each prompt, once per sample
        assert batch.prompt_ids == [PromptFormat().token_ids(tiny_tokenizer, [f"question {i}"])[0] for i in ids]


@pytest.mark.unit
def test_one_named_teacher_without_a_column_grades_every_sample(tiny_tokenizer):
    """``teacher_model: math=path`` and no ``teacher_column``: every sample goes to that teacher, whose
    grades reach the batch; samples of a teacher the run does not have fail instead of training on zeros."""
    from llmdistill.onpolicy import rollout
    from llmdistill.prompts import PromptFormat

    class Fixed:
        def score(self, batch, k, chunk_size):
            n = len(batch["target_ids"])
            return {"teacher_ids": torch.full((n, k), 7), "teacher_logprobs": torch.full((n, k), -0.5),
                    "teacher_token_logprobs": torch.full((n,), -0.25)}

    cfg = OnPolicyConfig(dataset="p", student_model="s", teacher_model="math=runs/t", prompts_per_step=2,
                         logprobs_top_k=3)
    stream = PromptStream(PromptTable.from_rows([{"prompt": f"question {i}"} for i in range(4)]), 0, Cursor(2))
    batch = rollout(_VersionedEngine(), stream, [0], PromptFormat(), tiny_tokenizer, cfg)[0]
    assert batch.teachers == ["math", "math"]
    graded = score({"math": Fixed()}, batch, cfg)
    assert (graded["teacher_ids"] == 7).all() and (graded["teacher_token_logprobs"] == -0.25).all()
    with pytest.raises(RuntimeError, match=r"samples routed to teacher\(s\) \['math'\], not one of \['code'\]"):
        score({"code": Fixed()}, batch, cfg)


@pytest.mark.unit
def test_steps_per_rollout_and_sync_every_must_agree():
    """Weights reach the engine only before a rollout, so a sync period that is not a whole number of
    rollouts is refused in one line; 1 and multiples are taken."""
    base = {"dataset": "p", "student_model": "s", "teacher_model": "t", "steps_per_rollout": 4}
    with pytest.raises(ConfigError) as err:
        OnPolicyConfig(**base, sync_every=6)
    assert str(err.value) == ("sync_every=6 with steps_per_rollout=4: weights are synced only before a rollout, so "
                              "set sync_every to 1 or a multiple of steps_per_rollout")
    assert OnPolicyConfig(**base, sync_every=1).sleep_level == 2
    assert OnPolicyConfig(**base, sync_every=4).sleep_level == 2  # every wake-up reloads the weights
    assert OnPolicyConfig(**base, sync_every=8).sleep_level == 1


@pytest.mark.unit
def test_a_rollout_server_that_cannot_take_weights_fails_in_one_line(synthetic_servers):
    from llmdistill.cli import one_line
    from llmdistill.generate.pool import ServerError
    from llmdistill.generate.synthetic_server import MODEL
    from llmdistill.onpolicy import ServerRollout

    server = synthetic_servers()  # serves /v1/completions and /health, no /collective_rpc
    cfg = OnPolicyConfig(dataset="p", student_model=MODEL, teacher_model="t", rollout_backend="server",
                         rollout_urls=[server.url], rollout_timeout=5)
    with pytest.raises(ServerError) as err:
        ServerRollout(cfg).probe()
    assert one_line(err.value) == str(err.value)
    assert str(err.value) == (f"rollout server {server.url} cannot reload weights: start it with VLLM_SERVER_DEV_MODE=1 "
                              "(that serves the /collective_rpc a sync calls)")
    lora = OnPolicyConfig(**{**cfg.__dict__, "use_peft": True, "lora_r": 12})
    with pytest.raises(ServerError) as err:
        ServerRollout(lora).probe()
    assert str(err.value) == (f"rollout server {server.url} cannot load LoRA adapters: start it with --enable-lora "
                              "--max-lora-rank 16 and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (or set lora_rollouts: "
                              "merged)")


@pytest.mark.unit
@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_a_rollout_server_that_misses_a_sync_samples_nothing_until_it_takes_one(
        prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path, monkeypatch, use_peft):
    """Two servers; B misses two syncs. Until it takes a later one (tried after a growing gap and a
    /health check) it gets no requests; a LoRA student's B reloads the base, then loads the adapter.
    No server: one error."""
    import llmdistill.onpolicy as op
    from llmdistill.generate.pool import ServerError

    down, calls, refuse_unload = set(), [], []

    def fake_post(url, body, timeout):
        server, route = url[:len("http://a")], url[len("http://a"):]
        calls.append((server, route))
        if server in down:
            return 0, "connection refused"
        if route == "/v1/unload_lora_adapter" and server in refuse_unload:
            return 500, "internal error"
        if route == "/v1/completions":
            return 200, json.dumps({"choices": [{"index": i, "token_ids": [7, i]} for i in range(len(body["prompt"]))]})
        return 200, "{}"

    def fake_healthy(url, timeout=2.0):
        calls.append((url, "/health"))
        return url not in down

    monkeypatch.setattr(op, "_post_json", fake_post)
    monkeypatch.setattr("llmdistill.vllm_runtime.healthy", fake_healthy)
    cfg = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "o", rollout_backend="server",
                 rollout_urls=["http://a", "http://b"], use_peft=use_peft, lora_r=4)
    engine = op.ServerRollout(cfg)
    model, _ = load_student(str(tiny_student_dir))
    if use_peft:
        model, adapter = op.with_lora(model, cfg, None)
        engine.use_adapter(adapter)
    many = [[1, 2]] * (2 * engine.PIECE_PROMPTS)  # two pieces: one per active server

    def sampled_by() -> set[str]:
        calls.clear()
        assert engine.sample(many, cfg) == [[7, i] for i in range(engine.PIECE_PROMPTS)] * 2
        return {server for server, route in calls if route == "/v1/completions"}

    engine.sync(model)
    assert engine.active == ["http://a", "http://b"] and sampled_by() == {"http://a", "http://b"}
    down.add("http://b")
    engine.sync(model)
    assert engine.active == ["http://a"] and sampled_by() == {"http://a"}
    asked_b = []
    for _ in range(3):  # sync 3: B down, only its /health is asked; 4: not asked (backing off); 5: B is back
        calls.clear()
        engine.sync(model)
        asked_b.append([route for server, route in calls if server == "http://b"])
        down.clear()
    back = ["/health", "/collective_rpc", "/reset_prefix_cache"]  # B's full reload when it is back
    if use_peft:  # then the newest adapter; the one it held from before it dropped out is unloaded
        back += ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"]
    assert asked_b == [["/health"], [], back]
    assert engine.active == ["http://a", "http://b"] and sampled_by() == {"http://a", "http://b"}
    if use_peft:  # it samples with the newest adapter, like A; the frozen base written for it is gone
        assert engine.adapters == {"http://a": engine.model, "http://b": engine.model}
        assert [p.name for p in engine.drops.directory.iterdir()] == [engine.model.rsplit("-", 1)[0]]
        # a server that cannot unload the old adapter still holds the new one: it keeps sampling
        refuse_unload.append("http://a")
        engine.sync(model)
        assert engine.active == ["http://a", "http://b"] and engine.adapters["http://a"] == engine.model
        refuse_unload.clear()
    down.update({"http://a", "http://b"})
    with pytest.raises(ServerError, match="no rollout server took the weights: rollout server http://a could not "
                                          "take the weights"):
        engine.sync(model)
    engine.close()


@pytest.mark.unit
def test_config_of_rollout_servers():
    base = dict(dataset="p.jsonl", student_model="s", teacher_model="t")
    with pytest.raises(ConfigError, match="rollout_backend server needs rollout_urls"):
        OnPolicyConfig(**base, rollout_backend="server")
    with pytest.raises(ConfigError, match="async_rollouts is for rollout_backend: server"):
        OnPolicyConfig(**base, async_rollouts=True)
    with pytest.raises(ConfigError, match="greedy rollouts are all the same"):
        OnPolicyConfig(**base, rollout_temperature=0.0, samples_per_prompt=2)
    with pytest.raises(ConfigError, match="sleep_mode is for the colocated engine"):
        OnPolicyConfig(**base, rollout_backend="server", rollout_urls=["http://h:1"], sleep_mode=True)
    with pytest.raises(ConfigError, match="lora_rollouts='fused' is not one of"):
        OnPolicyConfig(**base, use_peft=True, lora_rollouts="fused")
    with pytest.raises(ConfigError, match="vLLM serves LoRA adapters up to rank 512"):
        OnPolicyConfig(**base, use_peft=True, lora_r=1024)
    OnPolicyConfig(**base, use_peft=True, lora_r=1024, lora_rollouts="merged")
    OnPolicyConfig(**base, rollout_backend="server", rollout_urls=["http://h:1"], async_rollouts=True)
    # a LoRA student's base never changes: sleep mode keeps it in CPU RAM even when every step syncs
    assert OnPolicyConfig(**base, sleep_mode=True).sleep_level == 2
    assert OnPolicyConfig(**base, sleep_mode=True, use_peft=True).sleep_level == 1
    assert OnPolicyConfig(**base, sleep_mode=True, use_peft=True, lora_rollouts="merged").sleep_level == 2


@pytest.fixture(scope="module")
def student_server(tiny_student_dir):
    """A real ``vllm serve`` of the tiny student in dev mode (its weights can be reloaded), loading LoRAs at run time."""
    from llmdistill.vllm_runtime import start_local_server, stop_local_servers, wait_healthy

    url, proc = start_local_server(str(tiny_student_dir), "--max-logprobs", "1", "--enable-lora", "--max-lora-rank", "8",
                                   dev=True, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        stop_local_servers([proc])


@pytest.mark.integration
def test_two_processes_share_a_rollout_server_that_only_the_main_one_syncs(student_server, prompts, tiny_student_dir,
                                                                           tiny_random_teacher_dir, tmp_path):
    """2 training processes, async rollouts from one server, a LoRA student: each process samples its share,
    the main process alone writes and loads each adapter (the server ends with one new adapter, of the main
    process's run), and every step after the first trains on samples one update old."""
    import requests

    def served() -> set[str]:
        return {m["id"] for m in requests.get(student_server + "/v1/models", timeout=10).json()["data"]}

    before = served()
    cfg = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "two", rollout_backend="server",
                 rollout_urls=[student_server], async_rollouts=True, use_peft=True, lora_r=4)
    done = launch_two(cfg, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    added = served() - before
    assert len(added) == 1 and next(iter(added)).startswith("weights-")  # the newest adapter; the older unloaded
    history = json.loads((tmp_path / "two" / "log_history.json").read_text())
    assert [h["policy_lag"] for h in history] == [0.0, 1.0, 1.0]
    counts = json.loads((tmp_path / "two" / "manifest.json").read_text())["counts"]
    assert counts["optimizer_steps"] == 3 and counts["trained_tokens"] == counts["rollout_tokens"] > 0
    assert not (tmp_path / "two" / "rollout-weights").exists() or not any((tmp_path / "two" / "rollout-weights").iterdir())


@pytest.mark.integration
def test_a_synced_rollout_server_samples_from_the_trainers_weights(student_server, prompts, tiny_student_dir,
                                                                    tiny_random_teacher_dir, tmp_path):
    import socket

    import requests

    from llmdistill.onpolicy import ServerRollout, with_lora

    cfg = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "o", rollout_backend="server",
                 rollout_urls=[student_server])
    engine = ServerRollout(cfg)
    engine.probe()
    student, _ = load_student(str(tiny_student_dir))
    before, _ = load_student(str(tiny_student_dir))
    with torch.no_grad():  # an update the server must pick up
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    engine.sync(student)
    engine.sync(student)
    assert [d.name for d in engine.drops.directory.iterdir()] == ["weights-000002"]  # only the latest weights stay

    prompt = [1, 2, 3, 4]
    assert [len(c) for c in engine.sample([prompt] * 3, cfg)] == [cfg.max_new_tokens] * 3  # random init: never stops
    reply = requests.post(student_server + "/v1/completions", timeout=60, json={
        "model": str(tiny_student_dir), "prompt": prompt, "max_tokens": 16, "logprobs": 0, "return_token_ids": True})
    choice = reply.json()["choices"][0]
    ids, served = choice["token_ids"], torch.tensor(choice["logprobs"]["token_logprobs"])
    for model, close in ((student, True), (before, False)):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1], -1)
        gap = (served - logp[torch.arange(len(ids)), torch.tensor(ids)]).abs().max().item()
        assert gap < 1e-4 if close else gap > 1e-2, gap

    # several pieces over two servers, one of them down: each prompt still gets its own completions, in order
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}"
    engine.urls, engine.PIECE_PROMPTS = [down, student_server], 2
    greedy = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "o", rollout_temperature=0.0,
                    max_new_tokens=6)
    asked = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [10], [11, 12, 13]]
    got = engine.sample(asked, greedy)
    assert len(got) == len(asked)
    for prompt, completion in zip(asked, got, strict=True):  # the synced student's greedy choices after that prompt
        with torch.no_grad():
            logits = student(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]
        chosen = logits[torch.arange(len(completion)), torch.tensor(completion)]
        assert len(completion) == 6 and torch.all(chosen >= logits.max(-1).values - 1e-4), (prompt, completion)

    # a LoRA student of the original weights (the server holds the updated ones): the first sync sends its base,
    # then each sync only its adapter, loaded as a new LoRA, the previous one unloaded
    lora_cfg = config(prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path / "lora", rollout_backend="server",
                      rollout_urls=[student_server], use_peft=True, lora_r=4)
    lora = ServerRollout(lora_cfg)
    lora.probe()
    lora_student, adapter = with_lora(before, lora_cfg, None)
    lora.use_adapter(adapter)
    for seed in (0, 1):
        torch.manual_seed(seed)
        for name, p in lora_student.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        lora.sync(lora_student)
    served_models = [m["id"] for m in requests.get(student_server + "/v1/models", timeout=10).json()["data"]]
    assert lora.model == f"weights-000003-{lora.run_tag}" and lora.model in served_models  # 1: the base
    assert f"weights-000002-{lora.run_tag}" not in served_models  # unloaded
    assert [d.name for d in lora.drops.directory.iterdir()] == ["weights-000003"]
    assert (lora.drops.directory / "weights-000003" / "adapter_config.json").is_file()
    lora.close()
    assert not lora.drops.directory.exists()
    reply = requests.post(student_server + "/v1/completions", timeout=60, json={
        "model": lora.model, "prompt": prompt, "max_tokens": 16, "logprobs": 0, "return_token_ids": True})
    choice = reply.json()["choices"][0]
    ids, served = choice["token_ids"], torch.tensor(choice["logprobs"]["token_logprobs"])
    lora_student.eval()  # no LoRA dropout
    with torch.no_grad():
        with_adapter = torch.log_softmax(lora_student(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1], -1)
        with adapter.disable_adapter():
            without = torch.log_softmax(lora_student(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1], -1)
    rows, picked = torch.arange(len(ids)), torch.tensor(ids)
    assert (served - with_adapter[rows, picked]).abs().max() < 1e-4
    assert (served - without[rows, picked]).abs().max() > 1e-2  # the adapter counts


@pytest.mark.integration
@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_an_async_run_trains_each_step_on_samples_of_the_weights_one_update_old(
        use_peft, student_server, prompts, tiny_student_dir, tiny_random_teacher_dir, tmp_path):
    out = tmp_path / "async"
    manifest = op.run_onpolicy(config(prompts, tiny_student_dir, tiny_random_teacher_dir, out, max_steps=4,
                                      rollout_backend="server", rollout_urls=[student_server], async_rollouts=True,
                                      use_peft=use_peft, lora_r=4,  # the LoRA run as the 7B recipe's: bf16 base
                                      bf16=use_peft, gradient_checkpointing=use_peft))
    history = json.loads((out / "log_history.json").read_text())
    assert [h["policy_lag"] for h in history] == [0.0, 1.0, 1.0, 1.0]
    counts, seconds = manifest["counts"], manifest["compute"]["seconds"]
    assert counts["optimizer_steps"] == 4 and counts["rollout_tokens"] > 0
    assert manifest["compute"]["rollout_in_background_s"] > 0 and seconds["sync"] > 0
    assert manifest["counts"]["rollout_tokens"] == sum(h["completion_tokens"] * 4 for h in history)
    assert list((out / "rollout-weights").iterdir()) == []  # the run's weight files are removed at its end


@pytest.mark.unit
def test_the_lora_ranks_are_vllms_and_server_requests_state_every_sampling_setting():
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from llmdistill.config.onpolicy import MAX_VLLM_LORA_RANK
    from llmdistill.generate.pool import PLAIN_SAMPLING
    from llmdistill.vllm_runtime import VLLM_LORA_RANKS, vllm_lora_rank

    assert VLLM_LORA_RANKS == tuple(sorted(get_args(MaxLoRARanks))) and MAX_VLLM_LORA_RANK == VLLM_LORA_RANKS[-1]
    assert [vllm_lora_rank(r) for r in (1, 4, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    # every field a server would otherwise fill from the model's generation_config.json, at vLLM's own neutral value
    defaults = CompletionRequest.__private_attributes__["_DEFAULT_SAMPLING_PARAMS"].default
    neutral = {k: v for k, v in defaults.items() if k not in ("temperature", "top_p")}
    assert PLAIN_SAMPLING == neutral


def _sum_gradients_on(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: four parameters, their gradients set per rank, then summed and averaged."""
    import torch.distributed as dist

    from llmdistill.distributed import sum_gradients

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)] + [torch.nn.Parameter(torch.zeros(2, 2))]
        params[0].grad = torch.full((3,), float(rank + 1))  # 1 and 2
        if rank == 1:
            params[1].grad = torch.ones(3)  # only rank 1 reached it
        params[3].grad = torch.full((2, 2), 10.0 * (rank + 1))
        sum_gradients(params)
        summed = [None if p.grad is None else p.grad.clone() for p in params]
        sum_gradients(params, average=True)
        averaged = [None if p.grad is None else p.grad.clone() for p in params]
        torch.save({"summed": summed, "averaged": averaged}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.unit
def test_gradients_are_summed_over_processes_and_one_no_process_reached_stays_none(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sum_gradients_on, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        summed, averaged = got["summed"], got["averaged"]
        assert torch.equal(summed[0], torch.full((3,), 3.0)) and torch.equal(summed[1], torch.ones(3))
        assert summed[2] is None and averaged[2] is None  # the optimizer skips it, as in one process
        assert torch.equal(summed[3], torch.full((2, 2), 30.0))
        assert torch.equal(averaged[0], torch.full((3,), 3.0)) and torch.equal(averaged[3], torch.full((2, 2), 30.0))
