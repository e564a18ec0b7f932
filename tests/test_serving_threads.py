"""An ``Engine`` is single-threaded: a call that would overlap another thread's
call into it raises ``RuntimeError`` at once, and leaves the engine and the
call in progress intact (``torch_vkv._lifetime.one_thread``)."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("transformers")

from test_serving import _plain_torch_append, engine_for, greedy, model_of, reference  # noqa: E402

from torch_vkv._lifetime import one_thread  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_interpreted_triton")

__all__ = ["_plain_torch_append"]


def _step_held_in_another_thread(engine):
    """Starts ``engine.step()`` in a thread and holds it inside the model's forward;
    returns (release, join)."""
    inside, release = threading.Event(), threading.Event()
    execute = engine.runner.execute

    def held(batch):
        inside.set()
        assert release.wait(30)
        return execute(batch)

    engine.runner.execute = held
    errors: list = []
    thread = threading.Thread(target=lambda: errors.extend([] if engine.step() is not None else ["no outputs"]))
    thread.start()
    assert inside.wait(30), "the other thread never entered the forward"

    def join():
        thread.join(30)
        engine.runner.execute = execute
        assert not thread.is_alive() and not errors

    return release, join


def test_overlapping_calls_from_another_thread_raise_and_harm_nothing():
    model = model_of("llama")
    prompt = [5, 17, 42, 7, 99, 3]
    want = reference(model, prompt, 6)  # before the engine takes the model over
    with engine_for(model) as engine:
        rid = engine.add_request(prompt, greedy(6))
        release, join = _step_held_in_another_thread(engine)
        try:
            for call in (engine.step, lambda: engine.add_request([1, 2, 3], greedy(2)), lambda: engine.abort(rid),
                         engine.stats, engine.close, lambda: engine.generate([[1, 2]], greedy(1), use_tqdm=False)):
                with pytest.raises(RuntimeError, match=r"another thread is inside this Engine .*one thread at a time"):
                    call()
        finally:
            release.set()
            join()
        assert not engine.closed and engine.stats()["num_waiting"] + engine.stats()["num_running"] == 1
        outputs = {}
        while engine.has_unfinished_requests():  # this thread now drives it: the lock was released
            for out in engine.step():
                outputs[out.request_id] = out
        assert list(outputs) == [rid]
        assert outputs[rid].token_ids == want


def test_same_thread_reenters_and_threads_take_turns():
    model = model_of("llama")
    ref = reference(model, [4, 8, 15], 3)
    with engine_for(model) as engine:
        # generate() calls add_request() and step() from inside: the same thread may re-enter.
        want = engine.generate([[4, 8, 15]], greedy(3), use_tqdm=False)[0].token_ids
        assert want == ref
        # Calls from several threads that do not overlap (a lock around each, as docs/serving.md says) all run.
        lock = threading.Lock()
        ids: list = []

        def submit(i):
            with lock:
                ids.append(engine.add_request([4, 8, 15], greedy(3), request_id=f"t{i}"))

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out.token_ids
        assert sorted(results) == sorted(ids) == [f"t{i}" for i in range(4)]
        assert all(tokens == want for tokens in results.values())


def test_one_thread_names_the_class_and_method_and_releases_after_an_error():
    class Worker:
        @one_thread
        def run(self, fail):
            if fail:
                raise ValueError("bad input")
            return "ran"

    w = Worker()
    with pytest.raises(ValueError, match="bad input"):
        w.run(True)
    assert w.run(False) == "ran"  # an exception inside released the guard

    inside, release = threading.Event(), threading.Event()

    class Slow:
        @one_thread
        def work(self):
            inside.set()
            release.wait(30)

        @one_thread
        def other(self):
            return "other"

    s = Slow()
    t = threading.Thread(target=s.work)
    t.start()
    assert inside.wait(30)
    try:
        with pytest.raises(RuntimeError, match=r"^Slow\.other: another thread is inside this Slow"):
            s.other()
        assert Slow().other() == "other"  # the guard is per object
    finally:
        release.set()
        t.join(30)
    assert s.other() == "other"
