"""The HTTP server's engine loop owns its engine while it runs: an in-process
``llm.generate`` on the served ``LLM`` raises in its caller instead of taking
the engine between two of the loop's steps (which failed the loop and every
request in flight with it); a call already inside when the loop starts is
waited for."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")

from _tiny_checkpoint import build_checkpoint  # noqa: E402
from torch_vkv._lifetime import thread_guard  # noqa: E402
from torch_vkv.serving import LLM, SamplingParams  # noqa: E402
from torch_vkv.serving.server import EngineLoop  # noqa: E402
from torch_vkv.serving.server.loop import Delta  # noqa: E402
from torch_vkv.serving.server.protocol import HTTPError  # noqa: E402
from torch_vkv.serving.server.streaming import start  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


def _llm(ckpt) -> LLM:
    return LLM(str(ckpt), max_batch_size=4, max_seq_len=256, page_size=64 << 10)


def _serve(loop: EngineLoop, prompt: list[int]) -> tuple[str, int]:
    """One request through the loop: its finish reason and token count."""

    async def go():
        _, events = await start(loop, [(prompt, GREEDY)])
        while True:
            ev = await asyncio.wait_for(events.get(), 60)
            if isinstance(ev, Delta) and ev.finish_reason is not None:
                return ev.finish_reason, ev.num_tokens

    return asyncio.run(go())


def _wait_until(predicate, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _guard_holder(engine):
    owner = engine.__dict__.get("_one_thread")
    return None if owner is None else owner.thread_name


def test_generate_on_the_served_llm_raises_and_the_server_keeps_serving(ckpt):
    llm = _llm(ckpt)
    loop = EngineLoop(llm)
    loop.start()
    try:
        _wait_until(lambda: _guard_holder(llm.engine) == "torch_vkv-engine")
        with pytest.raises(RuntimeError, match=r"another thread is inside this Engine .*'torch_vkv-engine'"):
            llm.generate([[5, 6, 7]], GREEDY)
        with pytest.raises(RuntimeError, match="another thread is inside this Engine"):
            llm.engine.add_request([5, 6, 7], GREEDY)
        assert loop.alive and loop.error is None
        assert _serve(loop, [5, 6, 7]) == ("length", 3)
    finally:
        loop.stop()
    assert not loop.alive


def test_a_call_inside_the_engine_when_the_loop_starts_is_waited_for(ckpt, monkeypatch):
    llm = _llm(ckpt)
    step = llm.engine.step
    slow = threading.Event()

    def slow_step():
        if slow.is_set():
            time.sleep(0.05)
        return step()

    monkeypatch.setattr(llm.engine, "step", slow_step)
    expected = llm.generate([[5, 6, 7]], GREEDY)[0].outputs[0].token_ids
    slow.set()
    results = []
    user = threading.Thread(target=lambda: results.append(llm.generate([[5, 6, 7]], GREEDY)), name="user")
    user.start()
    _wait_until(lambda: _guard_holder(llm.engine) == "user")
    loop = EngineLoop(llm)
    loop.start()
    try:
        assert _serve(loop, [8, 9, 10]) == ("length", 3)  # queued until the user's call returned
        user.join(30)
        assert results and results[0][0].outputs[0].token_ids == expected
        assert loop.alive and loop.error is None
    finally:
        loop.stop()


def test_a_loop_stopped_while_waiting_for_the_engine_answers_what_was_queued(ckpt):
    llm = _llm(ckpt)
    release = threading.Event()
    held = threading.Event()

    def hold():
        with thread_guard(llm.engine, "test"):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold, name="holder")
    holder.start()
    assert held.wait(10)
    loop = EngineLoop(llm)
    loop.start()

    async def queued_then_stopped():
        handler = asyncio.ensure_future(start(loop, [([5, 6, 7], GREEDY)]))
        await asyncio.sleep(0.1)
        await asyncio.get_running_loop().run_in_executor(None, loop.stop, 5.0)
        with pytest.raises(HTTPError) as e:
            await asyncio.wait_for(handler, 30)
        return e.value

    try:
        err = asyncio.run(queued_then_stopped())
        assert err.status == 503 and err.code == "shutting_down", vars(err)
        assert not loop.alive
    finally:
        release.set()
        holder.join(30)
    llm.close()
