"""The OpenAI-compatible server, run as ``python -m torch_vkv serve`` in a subprocess on a tiny random Llama."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the server tests need httpx (test extra)")

from _tiny_checkpoint import build_checkpoint  # noqa: E402
from torch_vkv.serving import LLM, SamplingParams  # noqa: E402

# Whole models on the CPU: plain torch appends, not Triton's interpreter (conftest).
pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

MAX_SEQ_LEN = 512
ENGINE_ARGS = ["--max-seq-len", str(MAX_SEQ_LEN), "--page-size", "64KiB", "--chunk-size", "256"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m torch_vkv serve`` in a subprocess, its output in a log file."""

    def __init__(self, ckpt: Path, log: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, "-m", "torch_vkv", "serve", "--model", str(ckpt), "--port", str(self.port),
               "--served-model-name", "tiny", *ENGINE_ARGS, *args]  # fmt: skip
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not answer /health in 120 s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    srv = Server(ckpt, tmp_path_factory.mktemp("log") / "server.log", "--max-batch-size", "8", "--max-waiting", "64")
    yield srv
    srv.stop()
    assert srv.proc.returncode == 0, srv.output()


@pytest.fixture(scope="module")
def llm(ckpt):
    with LLM(str(ckpt), max_batch_size=4, max_seq_len=MAX_SEQ_LEN, page_size=64 << 10) as llm:
        yield llm


def _sse(lines) -> list:
    """The JSON events of a server-sent-event stream, then "[DONE]"."""
    events = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _stream(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json=dict(body, stream=True)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return _sse(r.iter_lines())


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)(\{[^}]*\})? ([-+0-9.eE]+|NaN)$", line)
        if m:
            labels = m.group(2) or ""
            reason = re.search(r'finished_reason="(\w+)"', labels)
            out[m.group(1) + (f"[{reason.group(1)}]" if reason else "")] = float(m.group(3))
    return out


PROMPT = "the quick brown fox"
GREEDY = {"model": "tiny", "max_tokens": 16, "temperature": 0, "ignore_eos": True}


# ----------------------------------------------------------------- correctness
def test_completion_streamed_equals_non_streamed_equals_llm(server, llm):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/completions", json=dict(GREEDY, prompt=PROMPT))
        assert r.status_code == 200, r.text
        body = r.json()
        events = _stream(c, "/v1/completions", dict(GREEDY, prompt=PROMPT))
    ref = llm.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["text"] == ref.outputs[0].text and choice["finish_reason"] == "length"
    n_prompt = len(llm.tokenizer(PROMPT)["input_ids"])
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 16, "total_tokens": n_prompt + 16}

    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(e["choices"][0]["text"] for e in chunks) == choice["text"]
    assert [e["choices"][0]["finish_reason"] for e in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert len(chunks) > 2  # really streamed
    assert events[-2]["choices"] == [] and events[-2]["usage"] == body["usage"]


def test_chat_streamed_equals_non_streamed_equals_llm(server, llm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json=dict(GREEDY, messages=messages))
        assert r.status_code == 200, r.text
        body = r.json()
        events = _stream(c, "/v1/chat/completions", dict(GREEDY, messages=messages))
    ref = llm.chat(messages, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    assert body["object"] == "chat.completion"
    msg = body["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": ref.outputs[0].text}
    n_prompt = len(ref.prompt_token_ids)
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 16, "total_tokens": n_prompt + 16}
    assert events[-1] == "[DONE]" and events[-2]["usage"] == body["usage"]
    chunks = [e for e in events[:-1] if e["choices"]]
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in chunks) == msg["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_strings_and_eos(server, llm):
    full = llm.generate(PROMPT, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0].outputs[0].text
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    body = dict(GREEDY, prompt=PROMPT, max_tokens=40, stop=[stop, "never-there"])
    with httpx.Client(base_url=server.url, timeout=60) as c:
        plain = c.post("/v1/completions", json=body).json()
        events = _stream(c, "/v1/completions", body)
        no_ignore = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0}).json()
    assert plain["choices"][0]["text"] == full[: full.find(stop)]
    assert plain["choices"][0]["finish_reason"] == "stop"
    assert plain["usage"]["completion_tokens"] < 40
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert streamed == plain["choices"][0]["text"]
    assert no_ignore["choices"][0]["finish_reason"] in ("stop", "length")  # EOS possible without ignore_eos


def test_seeded_sampling_is_reproducible(server):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7,
            "ignore_eos": True}  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=60) as c:
        a, b = (c.post("/v1/completions", json=body).json() for _ in range(2))
        streamed = "".join(e["choices"][0]["text"] for e in _stream(c, "/v1/completions", body)[:-1] if e["choices"])
    assert a["choices"][0]["text"] == b["choices"][0]["text"] == streamed


def test_openai_client(server, llm):
    openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    ref = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].outputs[0].text
    c = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert c.choices[0].text == ref and c.usage.completion_tokens == 8
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))  # fmt: skip
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref
    assert chunks[-1].usage.completion_tokens == 8
    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, seed=1)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="other", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_info_endpoints(server):
    assert httpx.get(server.url + "/health").status_code == 200
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["max_model_len"] == MAX_SEQ_LEN
    vocab_size = models["data"][0]["vocab_size"]  # token-id prompts lie below it
    for token, status in ((vocab_size - 1, 200), (vocab_size, 400)):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": [token], "max_tokens": 1}, timeout=60)
        assert r.status_code == status, (token, r.text)
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = _metrics(server.url)
    for name in ("vkv_num_requests_running", "vkv_num_requests_waiting", "vkv_kv_committed_bytes", "vkv_kv_used_bytes",
                 "vkv_num_preemptions_total", "vkv_time_to_first_token_seconds_count",
                 "vkv_time_per_output_token_seconds_count", "vkv_request_success_total[length]"):  # fmt: skip
        assert name in m and math.isfinite(m[name]) and m[name] >= 0, name
    assert m["vkv_time_to_first_token_seconds_count"] >= 1  # earlier tests finished requests


# ------------------------------------------------------------------ concurrency
async def _stream_async(client, body: dict, *, stop_after: int | None = None) -> dict:
    text, reason, chunks, usage = "", None, 0, None
    async with client.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            if ev["choices"]:
                chunks += 1
                text += ev["choices"][0]["text"]
                reason = ev["choices"][0]["finish_reason"]
            if stop_after is not None and chunks >= stop_after:
                return {"text": text, "reason": None, "chunks": chunks}  # leaves the block: disconnects
    return {"text": text, "reason": reason, "chunks": chunks, "usage": usage}


def test_32_concurrent_streams_and_a_disconnect(server, llm):
    prompts = ["hello world", "the quick brown fox", "a tiny model", "héllo wörld ✓"]
    refs = {p: o.outputs[0].text for p, o in zip(prompts, llm.generate(
        prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)))}  # fmt: skip
    before = _metrics(server.url)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            quitter = asyncio.create_task(_stream_async(
                client, dict(GREEDY, prompt="hello", max_tokens=MAX_SEQ_LEN - 8), stop_after=3))  # fmt: skip
            others = [asyncio.create_task(_stream_async(client, dict(GREEDY, prompt=prompts[i % 4])))
                      for i in range(31)]  # fmt: skip
            return await quitter, await asyncio.gather(*others)

    quitter, results = asyncio.run(run())
    assert quitter["chunks"] == 3
    for i, r in enumerate(results):
        assert r["reason"] == "length" and r["usage"]["completion_tokens"] == 16, r
        assert r["text"] == refs[prompts[i % 4]]  # batched greedy == alone
    deadline = time.monotonic() + 10
    while True:  # the engine notices the disconnect when it next writes to that stream
        m = _metrics(server.url)
        if m["vkv_request_success_total[abort]"] == before["vkv_request_success_total[abort]"] + 1:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    assert m["vkv_num_requests_running"] == 0 and m["vkv_num_requests_waiting"] == 0
    assert m["vkv_kv_used_bytes"] == 0  # the aborted request's pages are back
    assert m["vkv_request_success_total[length]"] == before["vkv_request_success_total[length]"] + 31


# ------------------------------------------------------------------ bad requests
BAD = [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": PROMPT, "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": PROMPT, "seed": "x"}, 400, "seed"),
    ("/v1/completions", {"prompt": PROMPT, "seed": 2**64}, 400, "seed"),  # killed the engine thread once
    ("/v1/completions", {"prompt": PROMPT, "top_k": 2**63}, 400, "top_k"),
    ("/v1/completions", {"prompt": PROMPT, "stop": [3]}, 400, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": PROMPT, "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5] * MAX_SEQ_LEN}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hello " * MAX_SEQ_LEN}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * MAX_SEQ_LEN}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{p.split('/')[-1]}-{b}"[:60] for p, b, _, _ in BAD])
def test_bad_request_gets_a_4xx_json_error_and_the_server_keeps_serving(server, path, body, status, param):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post(path, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["param"] == param and err["message"] and isinstance(err["type"], str)
        ok = c.post("/v1/completions", json=dict(GREEDY, prompt=PROMPT, max_tokens=2))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_malformed_json_and_unknown_route(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
        err = r.json()["error"]
        assert err["param"] is None and err["code"] == "invalid_json", err
        assert err["message"].startswith("body: expected a JSON object, got invalid JSON"), err
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = c.get("/v1/completions")
        assert r.status_code == 405 and "error" in r.json()


# ------------------------------------------------------- full queue, shutdown
def test_full_queue_503_then_sigterm_while_streaming_exits_cleanly(ckpt, tmp_path):
    """(SIGINT is what the ``server`` fixture's teardown sends, asserting exit status 0.)"""
    srv = Server(ckpt, tmp_path / "server.log", "--max-batch-size", "1", "--max-waiting", "0")
    try:
        long = dict(GREEDY, prompt="hello", max_tokens=MAX_SEQ_LEN - 8)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            with c.stream("POST", "/v1/completions", json=dict(long, stream=True)) as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()
                first = next(line for line in lines if line)
                assert first.startswith("data: ")
                full = c.post("/v1/completions", json=dict(GREEDY, prompt="x"))
                assert full.status_code == 503, full.text
                err = full.json()["error"]
                assert err["code"] == "queue_full" and set(err) == {"message", "type", "param", "code"}
                t0 = time.monotonic()
                srv.proc.send_signal(signal.SIGTERM)
                rest = _sse(list(lines))  # the stream ends at once: aborted
                assert time.monotonic() - t0 < 3
                assert rest[-1] == "[DONE]"
                assert [e for e in rest[:-1] if e["choices"]][-1]["choices"][0]["finish_reason"] == "abort"
        code = srv.proc.wait(30)
        # Most of this is the interpreter's own teardown (torch, transformers): about 5 s on a busy 2-core CPU.
        assert time.monotonic() - t0 < 15, srv.output()
        assert code == 0, srv.output()
        assert "Application shutdown complete" in srv.output()
    finally:
        srv.stop()


# ------------------------------------------------------------------ load client
def test_bench_serve_client_against_the_server(server, tmp_path):
    out = tmp_path / "bench"
    r = subprocess.run(
        [sys.executable, "-m", "torch_vkv", "bench", "serve", "--url", server.url, "--trace", "arxiv_summarization",
         "--num-requests", "6", "--request-rate", "20", "--max-prompt-tokens", "24", "--max-output-tokens", "6",
         "--out", str(out)],  # prompt ids below the model card's vocab_size (no --vocab-size)
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "serve_client.json").read_text())
    (summary,) = report["rows"]
    assert summary["completed"] == 6 and summary["failed"] == 0
    for key in ("ttft_mean_s", "ttft_p99_s", "tpot_mean_s", "itl_p50_s", "e2e_p90_s", "output_tokens_per_s"):
        assert math.isfinite(summary[key]) and summary[key] > 0, key
    # goodput against the default targets (2 s to the first token, 0.1 s a token after it)
    assert (summary["ttft_slo_s"], summary["tpot_slo_s"]) == (2.0, 0.1) and 0 <= summary["goodput_fraction"] <= 1
    requests = report["requests"]
    assert len(requests) == 6
    assert all(q["output_tokens"] == q["expected_output_tokens"] for q in requests)
    assert (out / "serve_client.md").read_text().startswith("# serve_client")


def test_bench_serve_in_process_refuses_client_only_flags(capsys):
    """Without --url, bench serve runs the engine in process: the load client's
    own flags are refused with a message that names --url."""
    from torch_vkv.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", "--num-requests", "2", "--request-rate", "4"])
    assert e.value.code == 2
    assert "--url" in capsys.readouterr().err


# ------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
def test_cuda_server_streams_greedy_text_and_batches_correctly(ckpt, tmp_path):
    """On the GPU (CUDA graphs replayed from the engine thread): streamed == non-streamed, batched == alone."""
    srv = Server(ckpt, tmp_path / "server.log", "--device", "cuda", "--max-batch-size", "8")
    try:
        prompts = ["hello world", "the quick brown fox", "a tiny model", "héllo wörld ✓"]
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            alone = [c.post("/v1/completions", json=dict(GREEDY, prompt=p)).json()["choices"][0]["text"]
                     for p in prompts]  # fmt: skip
            streamed = "".join(e["choices"][0]["text"]
                               for e in _stream(c, "/v1/completions", dict(GREEDY, prompt=prompts[0]))[:-1]
                               if e["choices"])  # fmt: skip
        assert streamed == alone[0]

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
                return await asyncio.gather(*(_stream_async(client, dict(GREEDY, prompt=prompts[i % 4]))
                                              for i in range(16)))  # fmt: skip

        for i, r in enumerate(asyncio.run(run())):
            assert r["reason"] == "length" and r["text"] == alone[i % 4]
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, srv.output()


# ------------------------------------------------------------ workloads, report
def test_traces_ship_with_the_package():
    from torch_vkv.bench.workloads import TRACES, load_trace, trace_path

    for name in TRACES:
        rows = load_trace(name)
        assert len(rows) > 100 and all(p >= 1 and o >= 1 for p, o in rows), name
    assert len(load_trace("arxiv_long_offline")) == 427
    assert (trace_path("sync_vs_async").parent / "LICENSE-vattention.txt").exists()


def test_workload_lengths_and_poisson_arrivals():
    from torch_vkv.bench.workloads import load_trace, make_requests, poisson_arrivals, workload_lengths

    lengths = workload_lengths("arxiv_long_offline", 500, seed=3)
    assert len(lengths) == 500 and set(lengths) <= set(load_trace("arxiv_long_offline"))
    assert len(set(workload_lengths("arxiv_summarization", 50, seed=3))) > 40  # a sample, not one row repeated
    assert workload_lengths("uniform", 20, seed=1) == workload_lengths("uniform", 20, seed=1)
    assert all(100 <= p <= 1024 and 100 <= o <= 1024 for p, o in workload_lengths("uniform", 200))
    t = poisson_arrivals(20000, rate=4.0, seed=0)
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert t[0] == 0 and all(g >= 0 for g in gaps)
    assert abs(sum(gaps) / len(gaps) - 0.25) < 0.25 * 0.03  # mean gap 1/rate, within 3% at 20k samples
    assert poisson_arrivals(5, math.inf) == [0.0] * 5
    specs = make_requests(lengths[:10], request_rate=2.0, max_prompt_tokens=50, max_output_tokens=7)
    assert all(s.prompt_tokens == 50 and s.output_tokens <= 7 for s in specs)
    with pytest.raises(ValueError, match="request_rate"):
        poisson_arrivals(3, 0.0)
    with pytest.raises(ValueError, match="workload: expected one of"):
        workload_lengths("nope", 3)


def test_summarize_percentiles_match_numpy():
    import numpy as np

    from torch_vkv.bench.serve_client import RequestResult, summarize

    rng = np.random.default_rng(0)
    results = []
    for i in range(50):
        ttft = float(rng.uniform(0.01, 1.0))
        itl = rng.uniform(0.001, 0.1, size=int(rng.integers(1, 20))).tolist()
        n = len(itl) + 1
        results.append(RequestResult(i, 10, n, ok=True, output_tokens=n, ttft_s=ttft, e2e_s=ttft + sum(itl),
                                     itl_s=itl))  # fmt: skip
    results.append(RequestResult(50, 10, 5, ok=False, error="HTTP 503"))
    row = summarize(results, 10.0, ttft_slo_s=0.5, tpot_slo_s=1.0)
    ttfts = [r.ttft_s for r in results[:50]]
    itls = [x for r in results[:50] for x in r.itl_s]
    for q in (50, 90, 99):
        assert row[f"ttft_p{q}_s"] == pytest.approx(np.percentile(ttfts, q), rel=1e-12)
        assert row[f"itl_p{q}_s"] == pytest.approx(np.percentile(itls, q), rel=1e-12)
    assert row["completed"] == 50 and row["failed"] == 1
    assert row["output_tokens_per_s"] == pytest.approx(sum(r.output_tokens for r in results[:50]) / 10.0)
    assert row["goodput_requests_per_s"] == pytest.approx(sum(t <= 0.5 for t in ttfts) / 10.0)
    tpots = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in results[:50]]
    assert row["tpot_mean_s"] == pytest.approx(np.mean(tpots), rel=1e-12)
