"""Generate at scale: streaming, the server pool, response parsing, and the recipe's allocations.

Fast tests use no model: a fake vLLM engine for the offline step loop, and synthetic servers
that answer in vLLM's exact format (``llmdistill.generate.synthetic_server``) for the pool.
The integration tests start two real vLLM servers on 127.0.0.1 (in parallel, ~40 s, shared by
the module): generate and score through the pool, then one server is killed mid-run.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from test_generate import K, assert_matches_reference, cli, gen_cfg, pairs, run_cli

from llmdistill.config.generate import GenerateConfig
from llmdistill.generate.engines import OfflineEngine, Work
from llmdistill.generate.inputs import Request
from llmdistill.generate.pool import ServerError, ServerPool
from llmdistill.generate.responses import CompletionStream, ResponseError, parse_scored
from llmdistill.generate.stage import prepare, write_stream
from llmdistill.generate.synthetic_server import (
    Faults,
    expected_completion,
    scored_arrays,
    scored_body,
    stream_events,
    teacher_output,
)
from llmdistill.tinyworld.task import generate_problems, to_records, write_jsonl
from llmdistill.vllm_runtime import start_local_server, stop_local_servers, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "r1-qwen7b"
TOKENS = 24


# ---------------------------------------------------------------------------------------
# response parsing: vLLM's own format, any byte split


@pytest.mark.unit
@pytest.mark.parametrize("k", [0, 1, 20])
def test_streamed_reply_parses_to_the_arrays_vllm_was_given(k):
    arrays = teacher_output(seed=k, n=53, k=k)
    blob = b"".join(stream_events(arrays, interval=7))
    rng = np.random.default_rng(k)
    cuts = np.sort(rng.choice(len(blob), size=40, replace=False))
    reader = CompletionStream(k)
    for part in np.split(np.frombuffer(blob, np.uint8), cuts):
        reader.feed(part.tobytes())
    got = reader.completion()
    np.testing.assert_array_equal(got.token_ids, arrays[0])
    np.testing.assert_array_equal(got.topk_ids, arrays[1])  # a sampled token in the top-k is put back in its rank
    np.testing.assert_array_equal(got.topk_logprobs, arrays[2])
    np.testing.assert_array_equal(got.token_logprobs, arrays[3])
    assert got.finish_reason == "length" and reader.chunks == 8


@pytest.mark.unit
def test_long_streams_are_kept_as_arrays_and_broken_streams_fail(monkeypatch):
    from llmdistill.generate import responses

    monkeypatch.setattr(responses, "PARSE_EVERY_BYTES", 2000)
    arrays = teacher_output(seed=1, n=300, k=4)
    events = stream_events(arrays, interval=3)
    reader = CompletionStream(4)
    for event in events:
        reader.feed(event)
    assert len(reader._parsed) > 5
    np.testing.assert_array_equal(reader.completion().topk_ids, arrays[1])
    early = CompletionStream(4)
    early.feed(b"".join(events[:-2]))
    with pytest.raises(ResponseError, match="ended before the completion finished"):
        early.completion()
    with pytest.raises(ResponseError, match="failed the request: boom"):
        CompletionStream(4).feed(b'data: {"error": {"message": "boom", "code": 500}}\n\n')


@pytest.mark.unit
def test_scored_reply_parses_to_the_completion_positions():
    prompt = list(range(3, 40))
    body = scored_body(prompt, 20)
    _, top_ids, top_lps, token_lps = scored_arrays(prompt, 20)
    got = parse_scored(body, 12, np.asarray(prompt[12:], dtype=np.int32), 20)
    assert got.finish_reason == "scored" and got.token_ids.tolist() == prompt[12:]
    np.testing.assert_array_equal(got.topk_ids, top_ids[11:])
    np.testing.assert_array_equal(got.topk_logprobs, top_lps[11:])
    np.testing.assert_array_equal(got.token_logprobs, token_lps[11:])
    with pytest.raises(ResponseError, match="scored other tokens"):
        parse_scored(body, 12, np.asarray(prompt[12:], dtype=np.int32) + 1, 20)


# ---------------------------------------------------------------------------------------
# the pool, against synthetic servers


def _work(n: int, samples: int = 1) -> list[Work]:
    reqs = [Request(f"p{i}", "", "", np.arange(2, 9 + i % 5, dtype=np.int32) * (i + 1)) for i in range(n)]
    return [Work(r, s) for r in reqs for s in range(samples)]


def _pool(urls: list[str], **kw) -> ServerPool:
    values = dict(model="synthetic", dataset="unused.jsonl", backend="server", server_urls=urls, max_tokens=TOKENS,
                  logprobs_top_k=K, progress_timeout=30.0, retry_backoff=0.01, health_interval=0.3, stream_interval=5)
    return ServerPool(GenerateConfig(**{**values, **kw}))


def _run_pool(pool: ServerPool, work: list[Work], on_result=None) -> dict:
    """Every completion the pool delivers, by key; fails on a key delivered twice or a wrong completion."""
    got = {}
    for item in pool.stream(work):
        if item is None:
            continue
        done, completion = item
        assert done.key not in got, f"{done.key} delivered twice"
        want = expected_completion(done.request.prompt_token_ids.tolist(), TOKENS, K, TOKENS)
        np.testing.assert_array_equal(completion.token_ids, want[0])
        np.testing.assert_array_equal(completion.topk_logprobs, want[2])
        got[done.key] = completion
        if on_result:
            on_result(len(got))
    return got


@pytest.fixture
def servers(synthetic_servers):
    """Synthetic servers whose completions are TOKENS long."""
    return lambda **kw: synthetic_servers(tokens=TOKENS, **kw)


@pytest.mark.unit
def test_pool_retries_only_the_failed_requests_on_another_server(servers):
    refusing = servers(faults=Faults(fail_first=3, fail_status=503))
    dropping = servers(faults=Faults(drop_after=1, faulty_requests=2))
    stalling = servers(faults=Faults(stall_after=1, faulty_requests=1))
    pool = _pool([refusing.url, dropping.url, stalling.url], concurrency_per_server=4, progress_timeout=2.0)
    work = _work(30, samples=2)
    got = _run_pool(pool, work)
    assert set(got) == {w.key for w in work}
    assert pool.retried == 3 + 2 + 1  # 503s, dropped streams, the stalled stream: nothing else ran twice
    assert refusing.requests + dropping.requests + stalling.requests == len(work) + pool.retried


@pytest.mark.unit
def test_pool_moves_the_requests_of_a_server_that_dies(servers):
    doomed, survivor = servers(), servers()
    pool = _pool([doomed.url, survivor.url], concurrency_per_server=3)
    work = _work(60)
    got = _run_pool(pool, work, on_result=lambda n: n == 10 and doomed.stop())
    assert set(got) == {w.key for w in work}
    stats = pool.stats()["completions_per_server"]
    assert stats[doomed.url] >= 1 and stats[doomed.url] + stats[survivor.url] == 60
    assert not pool.servers[0].healthy and pool.servers[1].healthy


@pytest.mark.unit
def test_pool_reads_capacity_from_the_server_and_routes_to_the_least_loaded(servers):
    small = servers(capacity=2, faults=Faults(stall_after=2, faulty_requests=None))  # holds its requests
    plain = servers()
    pool = _pool([small.url, plain.url], progress_timeout=60.0)
    probed = pool.probe()
    assert [s.capacity for s in probed] == [2, 64]  # /server_info's max_num_seqs; else the fallback
    configured = _pool([small.url, plain.url], concurrency_per_server=5).probe()
    assert [s.capacity for s in configured] == [5, 5]

    fast = servers()
    pool = _pool([small.url, fast.url], progress_timeout=60.0)
    work = _work(40)
    stream = pool.stream(work)
    got = {}
    for item in stream:  # the stalled server keeps 2 requests; everything else goes to the other
        if item is not None:
            got[item[0].key] = item[1]
        if len(got) == 38:
            break
    stream.close()
    assert small.streams == 2 and pool.servers[0].in_flight == 0


@pytest.mark.unit
def test_pool_stops_on_a_refused_request_and_on_a_wrong_model(servers):
    refusing = servers(faults=Faults(fail_first=10**6, fail_status=400))
    with pytest.raises(ServerError, match=r"refused a request \(HTTP 400\).*synthetic failure"):
        _run_pool(_pool([refusing.url]), _work(3))
    with pytest.raises(ServerError, match=r"serves \['synthetic'\], not 'other': set server_model"):
        _pool([servers().url], server_model="other").probe()


# ---------------------------------------------------------------------------------------
# the offline step loop, with a fake vLLM engine


class FakeLLMEngine:
    """vLLM's LLMEngine as OfflineEngine.stream uses it: a request takes prompt[-1] steps."""

    def __init__(self, k: int, step_seconds: float = 0.0):
        self.k, self.step_seconds = k, step_seconds
        self.vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=4))
        self.running: dict[str, list[int]] = {}
        self.most_running = 0
        self.aborted: list[str] = []

    def add_request(self, request_id, prompt, params):
        self.running[request_id] = [prompt["prompt_token_ids"][-1], 0]
        self.most_running = max(self.most_running, len(self.running))

    def step(self):
        time.sleep(self.step_seconds)
        out = []
        for request_id, state in list(self.running.items()):
            state[1] += 1
            if state[1] >= state[0]:
                del self.running[request_id]
                n, k = 3, self.k
                ids = np.tile(np.arange(40, 40 + k + 1), (n, 1))
                lps = np.tile(-np.arange(k + 1, dtype=np.float32) - 1, (n, 1))
                logprobs = SimpleNamespace(token_ids=ids.reshape(-1).tolist(), logprobs=lps.reshape(-1).tolist())
                out.append(SimpleNamespace(request_id=request_id, finished=True, outputs=[SimpleNamespace(
                    token_ids=[40] * n, logprobs=logprobs, finish_reason="length")]))
        return out

    def abort_request(self, request_ids):
        self.aborted += request_ids


def _offline(fake: FakeLLMEngine, max_in_flight: int | None) -> OfflineEngine:
    engine = object.__new__(OfflineEngine)  # the step loop without loading a model
    engine.llm, engine.k, engine.scoring, engine.params = SimpleNamespace(llm_engine=fake), fake.k, False, None
    engine.asked = fake.k
    engine.cfg, engine._ids = SimpleNamespace(max_in_flight=max_in_flight), itertools.count()
    return engine


def _steps_plan(tiny_tokenizer_dir, tmp_path, steps, **kw):
    """A plan of len(steps) prompts whose last prompt token says how many steps the fake engine takes."""
    data = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i:03d}", "prompt": f"question {i}", "answer": "1"}
                                              for i in range(len(steps))])
    cfg = gen_cfg(tiny_tokenizer_dir, data, tmp_path / "out", logprobs_top_k=K, num_samples=1, **kw)
    plan = prepare(cfg, "generate")
    for req, n in zip(plan.pending, steps, strict=True):
        req.prompt_token_ids = np.append(req.prompt_token_ids, n).astype(np.int32)
    return cfg, plan


@pytest.mark.unit
def test_offline_stream_keeps_a_bounded_window_and_writes_as_completions_finish(tiny_tokenizer_dir, tmp_path):
    steps = [400] + [2 + i % 4 for i in range(39)]  # one straggler, 100x the others
    cfg, plan = _steps_plan(tiny_tokenizer_dir, tmp_path, steps, flush_every=10, flush_seconds=0.4)
    fake = FakeLLMEngine(K, step_seconds=0.002)
    write_stream(_offline(fake, max_in_flight=6), plan, cfg)
    assert fake.most_running == 6 and not fake.running
    shards = sorted((tmp_path / "out").glob("part-*.parquet"))
    ids = [pq.read_table(p, columns=["prompt_id"])["prompt_id"].to_pylist() for p in shards]
    assert sorted(sum(ids, [])) == sorted(r.prompt_id for r in plan.pending)  # each once
    assert max(map(len, ids)) <= 5 and len(shards) >= 8  # shards of flush_every / 2
    assert ids[-1] == ["q000"]  # the straggler held up no shard: the other 39 were written before it ended
    assert _offline(FakeLLMEngine(K), None).max_in_flight == 8  # default: 2 x max_num_seqs


@pytest.mark.unit
def test_engines_ask_for_extra_log_probs_where_padding_rows_may_rank(tiny_tokenizer_dir, tmp_path, monkeypatch):
    """The in-process engine asks k + 8 of a model whose LM head has rows past its tokenizer (or whose
    tokenizer it cannot read), k of one without, within its max_logprobs (-1: no cap); a server pool
    asks what the servers' --max-logprobs allows beyond k (vLLM's default 20 when unset)."""
    import vllm

    from llmdistill.generate.engines import PADDING_MARGIN

    def fake_llm(rows: int, tokens: int | None):
        def make(**kwargs):
            def tokenizer():
                if tokens is None:
                    raise ValueError("Tokenizer not available when skip_tokenizer_init=True")
                return [None] * tokens
            config = SimpleNamespace(get_vocab_size=lambda: rows, max_logprobs=kwargs["max_logprobs"])
            return SimpleNamespace(llm_engine=SimpleNamespace(model_config=config), get_tokenizer=tokenizer)
        return make

    data = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "q", "answer": "1"}])
    for rows, tokens, extra, asked in ((72, 64, {}, K + PADDING_MARGIN), (64, 64, {}, K),
                                       (72, None, {}, K + PADDING_MARGIN), (72, 64, {"max_logprobs": K + 3}, K + 3),
                                       (72, 64, {"engine_kwargs": '{"max_logprobs": -1}'}, K + PADDING_MARGIN)):
        monkeypatch.setattr(vllm, "LLM", fake_llm(rows, tokens))
        engine = OfflineEngine(gen_cfg(tiny_tokenizer_dir, data, tmp_path / "o", logprobs_top_k=K, **extra))
        assert engine.asked == asked and engine.params.logprobs == asked, (rows, tokens, extra)
        assert OfflineEngine(gen_cfg(tiny_tokenizer_dir, data, tmp_path / "o", logprobs_top_k=K, **extra),
                             scoring=True).params.prompt_logprobs == asked
    assert [_pool(["http://x"], logprobs_top_k=k, **kw).asked for k, kw in (
        (20, {}), (10, {}), (20, {"max_logprobs": 28}), (20, {"max_logprobs": 24}), (0, {}))] == [20, 18, 28, 24, 0]


class PaddingRowsEngine(FakeLLMEngine):
    """A teacher whose LM head has rows past its tokenizer (``vocab``), asked for ``asked`` log-probs: its
    third sampled token is one of those rows, and they take two and one places in the first two top-k."""

    def __init__(self, k: int, asked: int, vocab: int):
        super().__init__(asked)
        self.vocab = vocab

    def step(self):
        out = super().step()
        for o in out:
            ids = np.tile(np.arange(40, 40 + self.k + 1), (3, 1))
            ids[:, 0] = [40, 41, self.vocab + 5]  # the sampled tokens (column 0)
            ids[0, 2], ids[0, 4], ids[1, 1] = self.vocab, self.vocab + 1, self.vocab + 2
            lps = np.tile(-np.arange(self.k + 1, dtype=np.float32) - 1, (3, 1))
            o.outputs[0].token_ids = ids[:, 0].tolist()
            o.outputs[0].finish_reason = "stop"
            o.outputs[0].logprobs = SimpleNamespace(token_ids=ids.reshape(-1).tolist(), logprobs=lps.reshape(-1).tolist())
        return out


@pytest.mark.unit
def test_ids_past_the_teachers_tokenizer_never_reach_a_shard(tiny_tokenizer_dir, tmp_path):
    """LM-head padding rows (vllm-project/vllm#13175): a sampled one cuts the completion before it
    (finish_reason ``unknown_token``, which the build drops as truncated and ends without EOS); in a
    top-k the known ids keep their order and log-probs, and the engine's extra entries move up."""
    from llmdistill.builder.filters import not_truncated
    from llmdistill.generate.engines import PADDING_MARGIN, Completion, asked_logprobs, known_ids_only

    cfg, plan = _steps_plan(tiny_tokenizer_dir, tmp_path, [1, 2], flush_every=100)
    vocab, asked = len(plan.tokenizer), asked_logprobs(K, K + 100)
    assert plan.info.vocab_size == vocab and asked == K + PADDING_MARGIN and asked_logprobs(K, K) == K
    engine = _offline(PaddingRowsEngine(K, asked, vocab), max_in_flight=4)
    engine.asked = asked
    write_stream(engine, plan, cfg)
    table = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet"))[0]).to_pylist()
    assert len(table) == 2
    # position 0 ranked [41, V, 43, V+1, 45, ...], position 1 [V+2, 42, 43, ...] (id 40 + c had -(c + 1))
    known = [[41, 43, *range(45, 45 + K - 2)], list(range(42, 42 + K))]
    for row in table:
        assert row["completion_token_ids"] == [40, 41] and row["finish_reason"] == "unknown_token"
        assert row["completion"] == plan.tokenizer.decode([40, 41])
        ids = np.asarray(row["topk_ids"]).reshape(2, K)
        lps = np.asarray(row["topk_logprobs"], dtype=np.float32).reshape(2, K)
        assert ids.tolist() == known and lps.tolist() == [[-(i - 40 + 1.0) for i in kept] for kept in known]
        assert row["token_logprobs"] == [-1.0, -1.0]
    assert not_truncated(["stop", "length", "unknown_token", "scored"]).tolist() == [True, False, False, True]

    # a scored completion (its tokens are the input's) is never cut; extra entries move up or are cut off;
    # more unknown ids than extra entries end the row in -inf entries on the smallest ids not in it
    scored = Completion(np.array([9, 9], np.int32), "scored", np.array([[1, 2, 4], [3, 2, 5]], np.int32),
                        np.array([[-1, -2, -3], [-1, -3, -4]], np.float32), np.zeros(2, np.float32))
    kept = known_ids_only(scored, 3, 2)
    assert kept.token_ids.tolist() == [9, 9] and kept.topk_ids.tolist() == [[1, 2], [2, 0]]
    assert kept.topk_logprobs.tolist() == [[-1.0, -2.0], [-3.0, -np.inf]]
    assert known_ids_only(scored, 10, 2).topk_ids.tolist() == [[1, 2], [3, 2]]
    two = Completion(scored.token_ids, "scored", scored.topk_ids[:, :2], scored.topk_logprobs[:, :2], scored.token_logprobs)
    assert known_ids_only(two, 10, 2) is two


@pytest.mark.unit
def test_offline_stream_flushes_on_time_and_aborts_what_is_left(tiny_tokenizer_dir, tmp_path):
    steps = [1] * 6 + [40] * 2
    cfg, plan = _steps_plan(tiny_tokenizer_dir, tmp_path, steps, flush_every=100, flush_seconds=0.3)
    write_stream(_offline(FakeLLMEngine(K, step_seconds=0.05), max_in_flight=8), plan, cfg)
    shards = sorted((tmp_path / "out").glob("part-*.parquet"))
    # the 6 quick ones waited at most flush_seconds / 2, not for the 2 slow ones (2 s)
    assert [len(pq.read_table(p)) for p in shards] == [6, 2]
    fake = FakeLLMEngine(K)
    stream = _offline(fake, max_in_flight=3).stream(Work(r, 0) for r in plan.pending[5:])  # 1, 40, 40 steps
    assert next(item for item in stream if item is not None)[0].key == ("q005", 0)
    stream.close()  # the caller stops early: what is still running is aborted
    assert sorted(fake.aborted) == sorted(fake.running)


# ---------------------------------------------------------------------------------------
# the recipe runs as allocated


def _sbatch(name: str) -> dict[str, str]:
    text = (RECIPE / "slurm" / name).read_text()
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))


def _flag(text: str, name: str, default: int) -> int:
    match = re.search(rf"--{name}[ =](\d+)", text)
    return int(match[1]) if match else default


def _array_size(spec: str) -> int:
    lo, hi = re.fullmatch(r"(\d+)-(\d+)(?:%\d+)?", spec).groups()
    return int(hi) - int(lo) + 1


@pytest.mark.unit
def test_recipe_allocations_match_the_configs():
    gen = yaml.safe_load((RECIPE / "generate.yaml").read_text())
    score = yaml.safe_load((RECIPE / "score.yaml").read_text())
    serve, serve_text = _sbatch("serve_teacher.sbatch"), (RECIPE / "slurm" / "serve_teacher.sbatch").read_text()

    # each server replica: its job's GPUs = the parallelism it is started with = what generate.yaml records
    gpus = int(serve["nodes"]) * int(serve["gpus-per-node"])
    tp, pp, dp = (_flag(serve_text, f"{p}-parallel-size", 1) for p in ("tensor", "pipeline", "data"))
    assert gpus == tp * pp * dp == gen["tensor_parallel_size"] * gen["pipeline_parallel_size"]
    # replicas: one server per array task, each a URL of the pool
    replicas = _array_size(serve["array"])
    assert replicas == len(gen["server_urls"]) >= 2 and gen["backend"] == "server"
    # the client keeps as many requests in flight on a server as it runs at once: no queueing, no idling
    assert gen["concurrency_per_server"] == _flag(serve_text, "max-num-seqs", 0) * dp > 0
    # the generate job is the client only: CPUs, no GPUs
    assert "gpus-per-node" not in _sbatch("generate.sbatch") and "gpus" not in _sbatch("generate.sbatch")

    # score runs its engine in the job: the job's GPUs = TP x PP
    job = _sbatch("score.sbatch")
    assert int(job["nodes"]) * int(job["gpus-per-node"]) == score["tensor_parallel_size"] * score.get(
        "pipeline_parallel_size", 1)
    train = _sbatch("train.sbatch")
    assert f"GPUS_PER_NODE={train['gpus-per-node']}" in (RECIPE / "slurm" / "train.sbatch").read_text()
    # onpolicy.sbatch: test_the_onpolicy_job_starts_what_its_config_records runs it


STUB = """#!{python}
import json, os, sys, time
with open({log!r}, "a") as f:
    f.write(json.dumps({{"argv": [os.path.basename(sys.argv[0])] + sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
if os.path.basename(sys.argv[0]) == "accelerate":
    time.sleep(1)  # the trainer: the servers started before it have written their lines when the job ends
"""


@pytest.mark.unit
def test_the_onpolicy_job_starts_what_its_config_records(tmp_path):
    """slurm/onpolicy.sbatch run with `python` and `accelerate` stubbed (each records its arguments and
    environment): the servers and the trainer it starts use the job's GPUs once each, in the numbers
    onpolicy.yaml records, and the trainer is pointed at exactly the servers started."""
    onpolicy = yaml.safe_load((RECIPE / "onpolicy.yaml").read_text())
    job = _sbatch("onpolicy.sbatch")
    log, stubs = tmp_path / "calls.jsonl", tmp_path / "bin"
    stubs.mkdir()
    for name in ("python", "accelerate"):
        (stubs / name).write_text(STUB.format(python=sys.executable, log=str(log)))
        (stubs / name).chmod(0o755)
    (tmp_path / "prompts.parquet").write_bytes(b"")  # present: the job does not build it
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PROMPTS": str(tmp_path / "prompts.parquet")}
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    done = subprocess.run(["bash", str(RECIPE / "slurm" / "onpolicy.sbatch")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    servers = [c for c in calls if "vllm.entrypoints.openai.api_server" in c["argv"]]
    (trainer,) = [c for c in calls if c["argv"][0] == "accelerate"]
    assert len(servers) + 1 == len(calls)

    def value(argv: list[str], flag: str, default: str | None = None) -> str:
        return argv[argv.index(flag) + 1] if flag in argv or default is None else default

    def values(argv: list[str], flag: str) -> list[str]:  # a list field: the arguments up to the next flag
        rest = argv[argv.index(flag) + 1:]
        return rest[:next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]

    def gpus(call: dict) -> set[str]:
        return set(call["env"]["CUDA_VISIBLE_DEVICES"].split(","))

    teachers = [c for c in servers if value(c["argv"], "--model") == onpolicy["teacher_model"]]
    rollouts = [c for c in servers if value(c["argv"], "--model") == onpolicy["student_model"]]
    assert len(teachers) + len(rollouts) == len(servers)
    assert onpolicy["teacher_backend"] == "server" and onpolicy["rollout_backend"] == "server"
    # the trainer asks exactly the servers started, by the URLs the config records
    for started, key in ((teachers, "teacher_urls"), (rollouts, "rollout_urls")):
        urls = sorted(f"http://127.0.0.1:{value(c['argv'], '--port')}" for c in started)  # started side by side
        assert urls == sorted(onpolicy[key]) and onpolicy[key] == values(trainer["argv"], f"--{key}")
    # GPUs: each teacher server TP x PP, each rollout server its TP, one per training process; all distinct
    for c in teachers:
        assert len(gpus(c)) == onpolicy["teacher_server_gpus"] == (
            int(value(c["argv"], "--tensor-parallel-size", "1")) * int(value(c["argv"], "--pipeline-parallel-size", "1")))
    for c in rollouts:
        assert len(gpus(c)) == onpolicy["rollout_server_gpus"] == int(value(c["argv"], "--tensor-parallel-size", "1"))
    processes = int(value(trainer["argv"], "--num_processes"))
    assert len(gpus(trainer)) == processes and onpolicy["prompts_per_step"] % processes == 0
    held = [g for c in calls for g in gpus(c)]
    assert len(held) == len(set(held)) == int(job["nodes"]) * int(job["gpus-per-node"])  # each GPU once, all used
    # the servers serve what the client asks for: the model names, top-k, context, LoRA rank, weight reloads
    for c in servers:
        assert value(c["argv"], "--served-model-name") == value(c["argv"], "--model")
        assert int(value(c["argv"], "--max-model-len")) >= onpolicy["max_model_len"]
        assert c["env"]["VLLM_SERVER_DEV_MODE"] == "1"
    for c in teachers:
        assert int(value(c["argv"], "--max-logprobs")) == onpolicy["teacher_max_logprobs"] >= onpolicy["logprobs_top_k"]
    for c in rollouts:
        assert c["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and "--enable-lora" in c["argv"]
        assert int(value(c["argv"], "--max-lora-rank")) >= onpolicy["lora_r"]
    assert onpolicy["use_peft"] and onpolicy["lora_rollouts"] == "adapter" and onpolicy["async_rollouts"]
    # the trainer: the DDP launch config, the student the rollout servers serve, a resume, and torchrun's
    # grace period (after it passes the SIGTERM on) within Slurm's lead time
    assert value(trainer["argv"], "--config_file") == "configs/accelerate/ddp_cpu.yaml"
    assert trainer["argv"][trainer["argv"].index("-m") + 1:][:2] == ["llmdistill", "onpolicy"]
    assert value(trainer["argv"], "--student_model") == onpolicy["student_model"]
    assert value(trainer["argv"], "--resume_from_checkpoint") == "latest"
    lead = int(re.fullmatch(r"B:TERM@(\d+)", job["signal"])[1])
    assert 30 < int(trainer["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < lead


FAKE_TRAINER = ("{python} -c 'import signal, sys, time\n"
                "def stop(*_):\n    time.sleep(0.5); print(\"checkpoint saved\", flush=True); sys.exit(3)\n"
                "signal.signal(signal.SIGTERM, stop); print(\"training\", flush=True); time.sleep(60)' &\n")


@pytest.mark.unit
def test_the_train_job_has_slurm_signal_the_ranks_and_torchrun_wait_for_their_checkpoint():
    """srun turns a SIGTERM it gets into SIGKILLs, so Slurm signals the job step's processes (no B:), srun
    runs in the foreground with the launcher exec'd as its task, and torchrun's grace period is longer
    than its 30 s default and shorter than the lead time; a resubmitted job resumes."""
    job, text = _sbatch("train.sbatch"), (RECIPE / "slurm" / "train.sbatch").read_text()
    lead = re.fullmatch(r"TERM@(\d+)", job["signal"])
    grace = int(re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)", text)[1])
    assert lead and 30 < grace < int(lead[1])
    srun = text[text.index("\nsrun "):]
    assert 'bash -c "exec accelerate launch' in srun and not srun.rstrip().endswith("&") and "trap" not in text
    assert "--resume_from_checkpoint latest" in srun


@pytest.mark.unit
def test_the_onpolicy_job_passes_slurms_early_sigterm_to_the_trainer_and_waits_for_its_checkpoint(tmp_path):
    """The job script's own lines after the trainer starts, run behind a stand-in trainer that takes half a
    second to save and exits 3: the script's SIGTERM reaches it, and the script exits with the trainer's
    status (not the 143 of its own interrupted wait) once it saved."""
    assert re.fullmatch(r"B:TERM@\d+", _sbatch("onpolicy.sbatch")["signal"])  # to the batch shell, early
    text = (RECIPE / "slurm" / "onpolicy.sbatch").read_text()
    assert "--resume_from_checkpoint latest" in text  # a resubmitted job resumes
    script = tmp_path / "job.sh"
    script.write_text("set -euo pipefail\n" + FAKE_TRAINER.format(python=sys.executable) + text[text.index("TRAINER=$!"):])
    job = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, text=True)
    assert job.stdout.readline() == "training\n"
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=30)
    assert (job.returncode, out) == (3, "checkpoint saved\n")


# ---------------------------------------------------------------------------------------
# integration: two real vLLM servers behind the pool


@pytest.fixture(scope="module")
def vllm_servers(tiny_random_teacher_dir):
    """Two OpenAI-compatible vLLM servers on 127.0.0.1, started together; the first reports its
    max_num_seqs (dev mode), the second does not. Killed at the end of the module."""
    started = [start_local_server(str(tiny_random_teacher_dir), "--max-logprobs", str(K), "--max-num-seqs", "8",
                                  dev=dev) for dev in (True, False)]
    urls, procs = [u for u, _ in started], [p for _, p in started]
    try:
        for url, proc in zip(urls, procs, strict=True):  # started together: they load side by side
            wait_healthy(url, proc, timeout=300)
        yield SimpleNamespace(urls=urls, procs=procs)
    finally:
        stop_local_servers(procs)


@pytest.fixture(scope="module")
def pool_prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pool") / "prompts.jsonl", to_records(generate_problems(48, seed=5)))


def _pool_flags(teacher, urls) -> list[str]:
    return ["--model", str(teacher), "--id_column", "id", "--backend", "server", "--server_urls", *urls,
            "--max_retries", "3", "--retry_backoff", "0.2", "--health_interval", "1", "--progress_timeout", "60"]


@pytest.mark.integration
def test_pool_of_real_servers_generates_and_scores(vllm_servers, tiny_random_teacher_dir, pool_prompts, tmp_path):
    cfg = GenerateConfig(model=str(tiny_random_teacher_dir), dataset=str(pool_prompts), backend="server",
                         server_urls=vllm_servers.urls)
    assert [s.capacity for s in ServerPool(cfg).probe()] == [8, 64]  # read from /server_info; else the fallback

    out = tmp_path / "gen"
    run_cli(cli("generate", *_pool_flags(tiny_random_teacher_dir, vllm_servers.urls), "--dataset", str(pool_prompts),
                "--output_dir", str(out), "--num_samples", "2", "--max_tokens", "16", "--max_prompts", "10",
                "--concurrency_per_server", "4", "--flush_every", "6"))
    assert sorted(pairs(out)) == sorted((r["id"], s) for r in to_records(generate_problems(48, seed=5))[:10]
                                        for s in range(2))
    assert_matches_reference(out, tiny_random_teacher_dir)
    per_server = json.loads((out / "manifest.json").read_text())["counts"]["completions_per_server"]
    assert sorted(per_server) == sorted(vllm_servers.urls) and min(per_server.values()) > 0

    rows = [{"id": p.id, "prompt": p.question, "completion": f"<think>{p.question}</think>\\boxed{{{p.answer}}}"}
            for p in generate_problems(12, seed=6)]
    score_out = tmp_path / "score"
    run_cli(cli("score", *_pool_flags(tiny_random_teacher_dir, vllm_servers.urls),
                "--dataset", str(write_jsonl(tmp_path / "pairs.jsonl", rows)), "--output_dir", str(score_out)))
    assert len(pairs(score_out)) == 12
    assert_matches_reference(score_out, tiny_random_teacher_dir)


@pytest.mark.integration
def test_pool_survives_a_server_killed_mid_run(vllm_servers, tiny_random_teacher_dir, pool_prompts, tmp_path):
    """Last in the module: it kills the second server. Every (prompt, sample) is written exactly once."""
    out = tmp_path / "gen"
    argv = cli("generate", *_pool_flags(tiny_random_teacher_dir, vllm_servers.urls), "--dataset", str(pool_prompts),
               "--output_dir", str(out), "--num_samples", "3", "--max_tokens", "48", "--concurrency_per_server", "6",
               "--flush_every", "4")
    proc = subprocess.Popen(argv, env={**os.environ, "LLMDISTILL_NO_PROGRESS": "1", "COLUMNS": "300"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list(out.glob("part-*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(vllm_servers.procs[1].pid, signal.SIGKILL)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    keys = pairs(out)
    assert len(keys) == len(set(keys)) == 48 * 3
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["retried_requests"] >= 1, "the kill should have hit requests in flight"
    assert "left the pool" in log
