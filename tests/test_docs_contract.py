"""Small checks that the documented API (README.md, docs/*.md) is what the code does: names,
signatures and behaviour a user reads there. Fast, CPU only."""

from __future__ import annotations

import pytest
import torch

from torch_vkv import KVCache, PagedKVCache


def test_completion_output_is_built_as_documented():
    # docs/serving.md: RequestOutput.outputs is a list of CompletionOutput(index, token_ids, finish_reason).
    from torch_vkv.serving import CompletionOutput, RequestMetrics, RequestOutput

    ids = [5, 6, 7]
    c = CompletionOutput(0, ids, "length")
    ids.append(8)  # a snapshot: later changes of the caller's list do not reach it
    assert c.index == 0 and c.token_ids == [5, 6, 7] and c.finish_reason == "length" and c.text == ""
    assert len(c) == 3
    kw = CompletionOutput(index=1, token_ids=(1, 2), finish_reason=None)
    assert kw.token_ids == [1, 2] and kw.finish_reason is None
    assert CompletionOutput(0, [5, 6, 7], "length") == c
    assert "token_ids=[5, 6, 7]" in repr(c)
    out = RequestOutput("r", [1], [c], True, RequestMetrics(0.0))
    assert out.token_ids == [5, 6, 7] and out.finish_reason == "length"


def test_kvcache_release_is_an_alias_of_free_like_the_paged_cache():
    # docs/attention.md: PagedKVCache speaks KVCache's vocabulary, reserve/can_reserve/release as aliases.
    for cache in (
        KVCache(1, 1, 16, max_batch_size=2, max_seq_len=64, dtype=torch.float32, device="cpu", page_size=4096),
        PagedKVCache(1, 1, 16, num_blocks=8, max_batch_size=2, max_seq_len=64, dtype=torch.float32, device="cpu"),
    ):
        slot = cache.alloc()
        assert cache.can_reserve(slot, 32)
        cache.reserve(slot, 32)
        assert cache.num_free_slots == 1
        cache.release(slot)
        assert cache.num_free_slots == 2
        if isinstance(cache, KVCache):
            cache.close()


def test_available_backends_lists_only_what_runs_on_the_device():
    """``available_backends(device)``: backends that can run on ``device`` in this process, so none
    for a CUDA device the process cannot use, and on the CPU at least ``sdpa``."""
    from torch_vkv import available_backends

    assert "sdpa" in available_backends("cpu")
    if not torch.cuda.is_available():
        assert available_backends("cuda") == [] and available_backends() == []
    assert available_backends(f"cuda:{max(torch.cuda.device_count(), 1) + 7}") == []


def test_alloc_refuses_more_tokens_than_a_slot_holds():
    cache = KVCache(num_layers=1, max_batch_size=2, max_seq_len=64, num_kv_heads=1, head_dim=8, device="cpu",
                    dtype=torch.float32)  # fmt: skip
    try:
        with pytest.raises(ValueError, match=r"num_tokens.*64.*got 65"):
            cache.alloc(65)
        assert cache.num_free_slots == 2  # the refused call took no slot
        slot = cache.alloc(64)
        cache.free(slot)
    finally:
        cache.close()


# ---- what a newcomer reads in README.md and docs/: files, names, signatures, defaults -------------------------

import glob  # noqa: E402
import inspect  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _flat(path: Path) -> str:
    """The doc's text with its line breaks as spaces (a signature may span two lines)."""
    return " ".join(path.read_text().split())


def test_every_link_and_repository_path_in_the_docs_exists():
    """Markdown links (``[text](path)``, images included) resolve from the doc's folder, and every path of the
    repository written in backticks (``tests/...``, ``torch_vkv/...``, ``scripts/diag_*.py``) exists."""
    missing = []
    for doc in DOC_FILES:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#")):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                missing.append(f"{doc.name}: link {target}")
        for path in re.findall(r"`((?:tests|torch_vkv|scripts|csrc|triton_kernels|docs)/[\w./*-]*)", text):
            path = path.split("::")[0].rstrip(".")
            if not glob.glob(str(ROOT / path)):
                missing.append(f"{doc.name}: path {path}")
    assert not missing, missing


def test_every_public_name_has_a_docstring_and_appears_in_the_docs():
    import torch_vkv

    text = "".join(doc.read_text() for doc in DOC_FILES)
    for name in torch_vkv.__all__:
        assert re.search(rf"\b{re.escape(name)}\b", text), f"torch_vkv.{name} appears in no doc"
        obj = getattr(torch_vkv, name)
        if callable(obj):
            assert len(inspect.getdoc(obj) or "") > 40, f"torch_vkv.{name} has no docstring"


def _documented_signature(doc: str, call: str) -> inspect.Signature:
    """The signature ``docs/<doc>`` writes in backticks as ``call(...)``."""
    found = re.findall(rf"`{re.escape(call)}\(([^`]*?)\)(?: -> [^`]*)?`", _flat(ROOT / "docs" / doc))
    assert found, f"{doc}: no `{call}(...)`"
    namespace = {"torch": torch}
    exec(f"def documented({found[0]}): pass", namespace)
    return inspect.signature(namespace["documented"])


def _signature(obj) -> list:
    params = list(inspect.signature(obj).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return [(p.name, p.kind, p.default) for p in params]


@pytest.mark.parametrize("doc, call, target", [
    ("serving.md", "Engine", "torch_vkv.serving:Engine.__init__"),
    ("serving.md", "SamplingParams", "torch_vkv.serving:SamplingParams"),
    ("serving.md", "engine.generate", "torch_vkv.serving:Engine.generate"),
    ("serving.md", "engine.add_request", "torch_vkv.serving:Engine.add_request"),
    ("serving.md", "LLM", "torch_vkv.serving:LLM.__init__"),
    ("hf.md", "VirtualKVCache", "torch_vkv.hf:VirtualKVCache.__init__"),
    ("attention.md", "paged_from_dense", "torch_vkv:paged_from_dense"),
    ("design.md", "prewarm", "torch_vkv:KVCache.prewarm"),
])
def test_documented_signatures_are_the_code(doc, call, target):
    """Names, order, keyword-only marks and defaults of the signatures the docs spell out (a reader copies
    them). ``engine.add_request(...) -> str`` is written with its return type: only the arguments count."""
    import importlib

    module, attr = target.split(":")
    if module == "torch_vkv.hf":
        pytest.importorskip("transformers")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    documented = [(p.name, p.kind, p.default) for p in _documented_signature(doc, call).parameters.values()]
    assert documented == _signature(obj)


def test_engine_stats_keys_are_the_documented_ones():
    """docs/serving.md lists every key of ``Engine.stats()``."""
    pytest.importorskip("transformers")
    from torch_vkv.bench.models import build_model
    from torch_vkv.serving import Engine

    text = _flat(ROOT / "docs" / "serving.md")
    listed = text[text.index("`stats()`: `num_running`") : text.index("`engine.host_seconds` alone")]
    documented = set(re.findall(r"`(\w+)`", listed.removeprefix("`stats()`:")))
    with Engine(build_model("tiny", device="cpu", dtype=torch.float32), max_batch_size=2, max_seq_len=32) as engine:
        assert documented == set(engine.stats())


def test_serve_usage_line_shows_the_parser_defaults():
    """docs/serving.md's ``python -m torch_vkv serve --model PATH [--option VALUE] ...`` shows the defaults
    of ``serve --help`` (options without a default show an example: not compared)."""
    from torch_vkv.serving.server.cli import build_parser

    text = _flat(ROOT / "docs" / "serving.md")
    usage = text[text.index("python -m torch_vkv serve --model PATH") :]
    usage = usage[: usage.index("```")]
    defaults = {a.option_strings[0]: a.default for a in build_parser()._actions if a.option_strings}
    shown = dict(re.findall(r"\[(--[\w-]+) ([^\]\s|]+)\]", usage))
    compared = {opt: value for opt, value in shown.items() if defaults.get(opt) is not None}
    assert {"--host", "--port", "--max-batch-size", "--chunk-size", "--block-size", "--max-waiting"} <= set(compared)
    assert {opt: str(defaults[opt]) for opt in compared} == compared


@pytest.mark.parametrize("folder, doc, start, end", [
    ("torch_vkv/attention", "docs/attention.md", "## Layout", "is reached by one plain import"),
    ("triton_kernels", "docs/attention.md", "## Layout", "is reached by one plain import"),
    ("torch_vkv/hf", "docs/hf.md", "## Who does what", "- **One owner of lengths.**"),
    ("torch_vkv/serving", "docs/serving.md", "## Design", "### The model, unchanged"),
    ("torch_vkv/serving/server", "docs/serving.md", "## Design", "### The model, unchanged"),
    ("torch_vkv/hf", "README.md", "| `torch_vkv/hf/` |", "\n"),
    ("torch_vkv/serving", "README.md", "| `torch_vkv/serving/` |", "\n"),
    ("csrc", "README.md", "| `csrc/` |", "\n"),
])
def test_the_layout_listings_name_every_module(folder, doc, start, end):
    """Each doc's map of a package (docs/attention.md "Layout", docs/hf.md "Who does what", docs/serving.md
    "Design", the README's table) names every module in it, so a newcomer finds a file from the docs."""
    text = (ROOT / doc).read_text()
    listing = text[text.index(start) :]
    listing = listing[: listing.index(end, len(start))]
    names = {p.stem for p in (ROOT / folder).iterdir() if p.suffix in (".py", ".h", ".cpp") and p.stem != "__init__"}
    assert names, folder
    assert not {n for n in names if not re.search(rf"\b{re.escape(n)}\b", listing)}


def _command_line_options() -> dict:
    from torch_vkv.bench.alloc import _parser as alloc
    from torch_vkv.bench.hf import _parser as hf
    from torch_vkv.bench.kernels import _parser as kernels
    from torch_vkv.bench.serve import build_parser as bench_serve
    from torch_vkv.demo import _parser as demo
    from torch_vkv.serving.server.cli import build_parser as serve

    parsers = {"demo": demo, "bench alloc": alloc, "bench hf": hf, "bench kernels": kernels, "bench serve": bench_serve,
               "serve": serve}  # fmt: skip
    options = {name: {s for a in make()._actions for s in a.option_strings} for name, make in parsers.items()}
    return {**options, "info": {"-h", "--help"}}


def test_every_option_the_docs_pass_to_the_command_line_exists():
    """``python -m torch_vkv CMD --option`` in code blocks, and ```bench serve --quick```-style commands in
    backticks: every option is one that command takes (a renamed option left in a doc is an error at once)."""
    options = _command_line_options()
    commands = []
    for doc in DOC_FILES:
        text = doc.read_text()
        for m in re.finditer(r"python -m torch_vkv ((?:bench )?\w+)((?:[^`\n]|\\\n)*)", text):
            commands.append((doc.name, m.group(1), re.split(r"\s#|\)|;|`", m.group(2))[0]))
        for span in re.findall(r"`([^`]+)`", text):
            m = re.match(r"(?:python -m torch_vkv )?(bench (?:alloc|kernels|hf|serve)|demo|serve|info)\b(.*)", span, re.S)
            if m:
                commands.append((doc.name, m.group(1), m.group(2)))
    assert len(commands) > 60
    unknown = [(doc, cmd, opt) for doc, cmd, rest in commands
               for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest) if opt not in options.get(cmd, ())]
    assert not unknown and {cmd for _, cmd, _ in commands} <= set(options)


def test_every_test_the_docs_name_exists():
    """``test_xyz`` in a doc is a test module, a test function of tests/ or the C++ core's csrc/tests/."""
    defined = {p.stem for p in (ROOT / "tests").glob("test_*.py")} | {p.stem for p in (ROOT / "csrc/tests").iterdir()}
    for path in (ROOT / "tests").glob("*.py"):
        defined |= set(re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(), re.M))
    named = {n for doc in DOC_FILES for n in re.findall(r"\b(test_[a-z0-9_]+)\b", doc.read_text())}
    assert named and not named - defined
