"""Generate at scale: stragglers, the cost of a kill, client throughput, and a pool that loses a server.

1. Stragglers (one in-process engine, the tiny random-init teacher, which writes to max_tokens):
   the same prompts with and without one prompt given 10x the others' max_tokens, through
   streaming (``write_stream``) and through today's batch mode (``LLM.generate`` per batch of
   256 prompts, a shard per batch). Target: streaming with the straggler >= 0.9x without it.
   The straggler is the first prompt: it runs beside the others, as one does in a real run,
   which lasts thousands of times longer than one completion. Beside it, one straggler per
   batch of 256: on a CPU a step with one sequence is cheap (~1 ms against ~14 ms with 256
   here), so one straggler's tail costs batch mode little; on a GPU a decode step costs about
   the same at any occupancy, and every batch waits for its slowest sequence.
2. Kill cost: a generate run SIGKILLed at a random moment. Every completion the engine hands
   back is logged (unbuffered) before it is buffered; the tokens of logged completions that are
   not in a finished shard were lost. Target: at most one flush interval's worth (flush_every
   completions or flush_seconds of generation, whichever is smaller): shards are written at
   half of either, so the half being written and the half filling never hold more.
3. Client throughput: completion tokens/s one client process parses through the pool, from a
   synthetic server (another process) that streams vLLM's exact format from memory. Target
   >= 100k tokens/s; beside it, today's client (64 threads, one non-streamed reply per request,
   a dict and a sort per token) against the same server and completions.
4. Pool fault tolerance: two real vLLM servers on 127.0.0.1, one SIGKILLed mid-run; the run
   must finish with every (prompt, sample) exactly once.

Load average is printed with every figure: other processes on a 2-core machine move them.

    python scripts/bench_generate_scale.py [--only stragglers,kill,client,pool]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_STRAGGLER_RATIO = 0.9
TARGET_CLIENT_TOK_S = 100_000
ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "LLMDISTILL_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false",
       "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _setup(workdir: Path, n_prompts: int) -> tuple[Path, Path]:
    """A random-init tiny teacher (with tokenizer) and a prompts file from the tiny world."""
    from llmdistill.tinyworld.models import make_model, save_model
    from llmdistill.tinyworld.task import generate_problems, to_records, write_jsonl
    from llmdistill.tinyworld.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    teacher = save_model(make_model("teacher", tokenizer, seed=0), tokenizer, workdir / "teacher")
    prompts = write_jsonl(workdir / "prompts.jsonl", to_records(generate_problems(n_prompts, seed=0)))
    return teacher, prompts


def _config(workdir: Path, teacher: Path, prompts: Path, **kw):
    from llmdistill.config.generate import GenerateConfig

    values = dict(model=str(teacher), dataset=str(prompts), id_column="id", passthrough_columns=["answer"],
                  output_dir=str(workdir / "out"), num_samples=1, temperature=1.0, top_p=1.0, logprobs_top_k=20,
                  dtype="bfloat16", max_model_len=256, enforce_eager=True)
    return GenerateConfig(**{**values, **kw})


# ---------------------------------------------------------------------------------------
# 1. stragglers (worker process)


def straggler_worker(args: argparse.Namespace) -> dict:
    from llmdistill.generate.engines import OfflineEngine
    from llmdistill.generate.stage import prepare, write_stream

    workdir = Path(args.workdir)
    teacher, prompts = _setup(workdir, args.prompts)
    cfg = _config(workdir, teacher, prompts, max_tokens=args.max_tokens, flush_every=512)  # shards of 256, as batches
    straggler_tokens = 10 * args.max_tokens

    class Engine(OfflineEngine):
        """The recipe's engine; every completion runs to its max_tokens (min_tokens: the random teacher can
        stop early), and the prompts in ``stragglers`` get 10x max_tokens."""

        stragglers: set[str] = set()

        def params_for(self, work):
            params = self.params.clone()
            if work.request.prompt_id in self.stragglers:
                params.max_tokens = straggler_tokens
            params.min_tokens = params.max_tokens
            return params

    engine = Engine(cfg)
    plan = prepare(cfg, "generate")
    cases = {"without": set(), "with": {plan.pending[0].prompt_id},
             "with_one_per_batch": {r.prompt_id for r in plan.pending[::256]}}

    def streaming(run: str) -> tuple[float, int]:
        plan.directory = workdir / f"stream-{run}"
        t0 = time.perf_counter()
        write_stream(engine, plan, cfg)
        return time.perf_counter() - t0, _tokens(plan.directory)

    def batches(run: str) -> tuple[float, int]:
        """Today's batch mode: one LLM.generate per 256 prompts, a shard per batch written in the background."""
        from concurrent.futures import ThreadPoolExecutor

        from vllm.inputs import TokensPrompt

        from llmdistill.formats import shard_name, write_generation_shard
        from llmdistill.generate.engines import Work
        from llmdistill.generate.stage import teacher_rows

        def write_shard(finished: list, path: Path) -> None:
            write_generation_shard(teacher_rows(finished, plan), path, cfg.logprobs_top_k, plan.info.teacher,
                                   plan.passthrough)

        directory = workdir / f"batch-{run}"
        t0, pending = time.perf_counter(), None
        with ThreadPoolExecutor(1) as writer:
            for i in range(0, len(plan.pending), 256):
                batch = [Work(r, 0) for r in plan.pending[i:i + 256]]
                outs = engine.llm.generate([TokensPrompt(prompt_token_ids=w.token_ids) for w in batch],
                                           [engine.params_for(w) for w in batch], use_tqdm=False)
                finished = [(w, engine._completion(o, w)) for w, o in zip(batch, outs, strict=True)]
                if pending is not None:
                    pending.result()
                pending = writer.submit(write_shard, finished, directory / shard_name(i // 256))
            pending.result()
        return time.perf_counter() - t0, _tokens(directory)

    streaming("warmup")
    figures: dict[str, tuple[float, int]] = {}
    loads = []
    for repeat in range(args.repeats):  # interleaved, the fastest run of each counts: other processes slow single runs
        for mode, fn in (("stream", streaming), ("batch", batches)):
            for label, stragglers in cases.items():
                engine.stragglers = stragglers
                seconds, tokens = fn(f"{label}-{repeat}")
                key = f"{mode}_{label}"
                if key not in figures or seconds < figures[key][0]:
                    figures[key] = (seconds, tokens)
        loads.append(load_average())
    out = {"prompts": len(plan.pending), "max_tokens": args.max_tokens, "straggler_max_tokens": straggler_tokens,
           "max_num_seqs": engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs}
    for key, (seconds, tokens) in figures.items():
        out[f"{key}_straggler_tok_per_s"] = round(tokens / seconds)
    for mode in ("stream", "batch"):
        for label in ("with", "with_one_per_batch"):
            out[f"{mode}_ratio_{label}_over_without_straggler"] = round(
                out[f"{mode}_{label}_straggler_tok_per_s"] / out[f"{mode}_without_straggler_tok_per_s"], 3)
    out["target_stream_ratio_min"] = TARGET_STRAGGLER_RATIO
    out["load_average_during"] = " / ".join(loads)
    return out


def _tokens(directory: Path) -> int:
    from llmdistill.formats import generation_counts

    return generation_counts(directory)["completion_tokens"]


# ---------------------------------------------------------------------------------------
# 2. kill cost (worker process, killed by the parent)


def kill_worker(args: argparse.Namespace) -> None:
    from llmdistill.generate.engines import OfflineEngine
    from llmdistill.generate.stage import prepare, write_stream

    workdir = Path(args.workdir)
    teacher, prompts = _setup(workdir, args.prompts)
    cfg = _config(workdir, teacher, prompts, max_tokens=args.max_tokens, flush_every=args.flush_every,
                  flush_seconds=args.flush_seconds)
    plan = prepare(cfg, "generate")
    engine = OfflineEngine(cfg)
    log = os.open(workdir / "finished.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    stream = engine.stream

    def logged(work):
        for item in stream(work):
            if item is not None:  # on record before the run buffers it: what a SIGKILL can lose
                os.write(log, f"{time.time():.4f} {item[0].request.prompt_id} {item[0].sample_index} "
                              f"{len(item[1].token_ids)}\n".encode())
            yield item

    engine.stream = logged
    write_stream(engine, plan, cfg)


def kill_cost(workdir: Path, prompts: int, max_tokens: int, flush_every: int, flush_seconds: float) -> dict:
    from llmdistill.formats import read_generation_keys

    argv = [sys.executable, __file__, "--kill-worker", "--workdir", str(workdir), "--prompts", str(prompts),
            "--max_tokens", str(max_tokens), "--flush_every", str(flush_every), "--flush_seconds", str(flush_seconds)]
    proc = subprocess.Popen(argv, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log, out = workdir / "finished.log", workdir / "out"
    kill_after = int(prompts * random.uniform(0.3, 0.7))  # a random moment of the run
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.02)
    load = load_average()
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the kill-cost run ended before it was killed:\n{err.decode()[-3000:]}")
    finished = [line.split() for line in log.read_text().splitlines()]
    durable = read_generation_keys(out)
    lost = [f for f in finished if (f[1], int(f[2])) not in durable]
    times = [float(f[0]) for f in finished]
    tokens = [int(f[3]) for f in finished]
    tok_per_s = sum(tokens) / max(times[-1] - times[0], 1e-9)
    interval = min(flush_every * sum(tokens) / len(tokens), flush_seconds * tok_per_s)
    lost_tokens = sum(int(f[3]) for f in lost)
    return {"kill_finished_completions": len(finished), "kill_written_completions": len(durable),
            "kill_lost_completions": len(lost), "kill_lost_tokens": lost_tokens,
            "kill_flush_interval_tokens": round(interval), "kill_lost_over_flush_interval": round(lost_tokens / interval, 3),
            "target_kill_lost_over_flush_interval_max": 1.0,
            "kill_settings": f"flush_every {flush_every}, flush_seconds {flush_seconds}, {tok_per_s:.0f} tok/s",
            "kill_load_average": load}


# ---------------------------------------------------------------------------------------
# 3. client throughput


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def todays_client_parse(body: dict, k: int) -> int:
    """Today's (before streaming) ServerEngine reply parsing: a dict sort per token. Returns the tokens parsed."""
    import numpy as np

    def token_id(token: str) -> int:
        return int(token.removeprefix("token_id:"))

    def sorted_topk(entries: dict[str, float]) -> tuple[list[int], list[float]]:
        best = sorted(entries.items(), key=lambda kv: -kv[1])[:k]
        return [token_id(t) for t, _ in best], [lp for _, lp in best]

    n = 0
    for choice in sorted(body["choices"], key=lambda c: c["index"]):
        lp = choice["logprobs"]
        best = [sorted_topk(entries) for entries in lp["top_logprobs"]]
        n_tok = len(lp["tokens"])
        np.asarray([token_id(t) for t in lp["tokens"]], dtype=np.int32)
        np.asarray([ids for ids, _ in best], dtype=np.int32).reshape(n_tok, k)
        np.asarray([lps for _, lps in best], dtype=np.float32).reshape(n_tok, k)
        np.asarray(lp["token_logprobs"], dtype=np.float32)
        n += n_tok
    return n


def todays_client(url: str, prompts: list[list[int]], tokens: int, k: int, concurrency: int = 64) -> int:
    """Today's (before streaming) ServerEngine: a thread per request in flight, one non-streamed reply each,
    parsed by :func:`todays_client_parse`. Returns the completion tokens parsed."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests

    local = threading.local()

    def one(prompt: list[int]) -> int:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        body = {"model": "synthetic", "prompt": prompt, "n": 1, "max_tokens": tokens, "logprobs": k,
                "return_tokens_as_token_ids": True}
        return todays_client_parse(local.session.post(url + "/v1/completions", json=body, timeout=600).json(), k)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return sum(pool.map(one, prompts))


def client_throughput(requests: int = 400, tokens: int = 2048, k: int = 20) -> dict:
    import numpy as np

    from llmdistill.config.generate import GenerateConfig
    from llmdistill.generate.engines import Work
    from llmdistill.generate.inputs import Request
    from llmdistill.generate.pool import ServerPool

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "llmdistill.generate.synthetic_server", "--port", str(port),
                               "--tokens", str(tokens), "--capacity", "64"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **ENV})
    try:
        server.stdout.readline()
        cfg = GenerateConfig(model="synthetic", dataset="unused.jsonl", backend="server",
                             server_urls=[f"http://127.0.0.1:{port}"], max_tokens=tokens, logprobs_top_k=k)
        pool = ServerPool(cfg)
        work = [Work(Request(f"p{i}", "", "", np.arange(1, 30, dtype=np.int32) * (1 + i % 4)), 0)
                for i in range(requests)]
        list(pool.stream(work[:8]))  # the server builds its 4 replies once
        best = None
        for _ in range(3):
            t0 = time.perf_counter()
            parsed = sum(len(item[1].token_ids) for item in pool.stream(work) if item is not None)
            best = min(best or 1e9, time.perf_counter() - t0)
        prompts = [w.request.prompt_token_ids.tolist() for w in work]
        todays_client(cfg.server_urls[0], prompts[:8], tokens, k)  # the server builds its 4 replies once
        t0 = time.perf_counter()
        old = todays_client(cfg.server_urls[0], prompts, tokens, k)
        old_tok_s = old / (time.perf_counter() - t0)
        load = load_average()
    finally:
        server.kill()
        server.wait()
    return {"client_tok_per_s": round(parsed / best), "target_client_tok_per_s_min": TARGET_CLIENT_TOK_S,
            "todays_client_tok_per_s": round(old_tok_s),
            "client_speedup_over_today": round(parsed / best / old_tok_s, 1),
            "client_settings": f"{requests} streamed completions x {tokens} tokens, top-{k}, stream_interval "
                               f"{cfg.stream_interval}, concurrency 64", "client_load_average": load}


# ---------------------------------------------------------------------------------------
# 4. a pool of two real vLLM servers, one killed mid-run


def pool_fault_tolerance(workdir: Path, prompts: int = 64, samples: int = 3, max_tokens: int = 48) -> dict:
    import requests

    from llmdistill.formats import read_generation_table

    teacher, prompt_file = _setup(workdir, prompts)
    procs, urls = [], []
    for _ in range(2):
        port = _free_port()
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher), "--host",
                "127.0.0.1", "--port", str(port), "--max-logprobs", "20", "--enforce-eager", "--dtype", "bfloat16",
                "--max-model-len", "256", "--max-num-seqs", "16", "--distributed-executor-backend", "uni"]
        procs.append(subprocess.Popen(argv, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url, proc in zip(urls, procs, strict=True):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError("a vLLM server exited at start")
                try:
                    if requests.get(url + "/health", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(1)
        out = workdir / "pool"
        argv = [sys.executable, "-m", "llmdistill", "generate", "--model", str(teacher), "--dataset",
                str(prompt_file), "--id_column", "id", "--backend", "server", "--server_urls", *urls,
                "--concurrency_per_server", "16", "--num_samples", str(samples), "--max_tokens", str(max_tokens),
                "--flush_every", "8", "--retry_backoff", "0.2", "--health_interval", "1", "--output_dir", str(out)]
        t0 = time.perf_counter()
        run = subprocess.Popen(argv, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while not list(out.glob("part-*.parquet")) and run.poll() is None:
            time.sleep(0.05)
        os.killpg(procs[1].pid, signal.SIGKILL)
        killed_at = time.perf_counter() - t0
        _, err = run.communicate()
        wall = time.perf_counter() - t0
        if run.returncode != 0:
            raise RuntimeError(f"generate through the pool failed:\n{err.decode()[-3000:]}")
        table, _ = read_generation_table(out, columns=["prompt_id", "sample_index"])
        keys = list(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist(), strict=True))
        counts = json.loads((out / "manifest.json").read_text())["counts"]
        return {"pool_completions": len(keys), "pool_expected": prompts * samples,
                "pool_exactly_once": len(keys) == len(set(keys)) == prompts * samples,
                "pool_retried_requests": counts["retried_requests"], "pool_server_killed_at_s": round(killed_at, 1),
                "pool_wall_s": round(wall, 1), "pool_load_average": load_average()}
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------


def run(only: str | None = None, repeats: int = 2) -> dict:
    """Measure everything (or the comma-separated ``only``) and return the figures (for ``scripts/bench.py``)."""
    parts = set((only or "stragglers,kill,client,pool").split(","))
    out: dict = {"load_average_before": load_average()}
    with tempfile.TemporaryDirectory(prefix="bench-generate-scale-") as tmp:
        tmp = Path(tmp)
        if "stragglers" in parts:
            result = tmp / "stragglers.json"
            argv = [sys.executable, __file__, "--straggler-worker", str(result), "--workdir", str(tmp / "s"),
                    "--prompts", "4096", "--max_tokens", "16", "--repeats", str(repeats)]
            proc = subprocess.run(argv, env={**os.environ, **ENV}, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"straggler worker failed:\n{proc.stderr[-3000:]}")
            out.update(json.loads(result.read_text()))
        if "kill" in parts:
            (tmp / "k").mkdir()
            out.update(kill_cost(tmp / "k", prompts=4096, max_tokens=16, flush_every=512, flush_seconds=2.0))
        if "client" in parts:
            out.update(client_throughput())
        if "pool" in parts:
            (tmp / "p").mkdir()
            out.update(pool_fault_tolerance(tmp / "p"))
    out["load_average_after"] = load_average()
    return out


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated: stragglers,kill,client,pool")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--straggler-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kill-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--max_tokens", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--flush_every", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--flush_seconds", type=float, default=2.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.straggler_worker:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        Path(args.straggler_worker).write_text(json.dumps(straggler_worker(args)))
        return
    if args.kill_worker:
        kill_worker(args)
        return
    result = run(args.only, args.repeats)
    width = max(map(len, result))
    sys.stdout.write("\n".join(f"{k:<{width}}  {v}" for k, v in result.items()) + "\n")


if __name__ == "__main__":
    _main()
