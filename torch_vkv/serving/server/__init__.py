"""An OpenAI-compatible HTTP server on the engine: ``python -m torch_vkv serve --model PATH``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as
server-sent events with ``stream: true``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text format). See ``docs/serving.md``, "HTTP API".

Threads::

    asyncio event loop (uvicorn, FastAPI)           engine loop thread (owns the Engine)
    handler: validate, tokenize ----- commands -->  add_request / abort
             await its asyncio.Queue <-- events --  step(); detokenize; stop strings
                       (loop.call_soon_threadsafe)

The engine is touched only by its thread; a request waits on its own queue, so
no request blocks another's tokens. A client that goes away mid-stream has its
request aborted (its pages return). SIGINT/SIGTERM abort every request in
flight, end the streams, then close the engine; the process exits with 0.

Modules, one concept each:

* :mod:`~torch_vkv.serving.server.loop`: ``EngineLoop``, the engine thread, its commands and events;
* :mod:`~torch_vkv.serving.server.protocol`: the request schemas (pydantic) and error bodies;
* :mod:`~torch_vkv.serving.server.app`: ``create_app``, the FastAPI app and its routes;
* :mod:`~torch_vkv.serving.server.streaming`: one answer, a JSON body or server-sent events;
* :mod:`~torch_vkv.serving.server.metrics`: the Prometheus registry;
* :mod:`~torch_vkv.serving.server.cli`: ``serve`` (uvicorn, signals) and ``main`` (the command line).
"""

from torch_vkv.serving.server.app import create_app
from torch_vkv.serving.server.cli import DTYPES, build_parser, main, serve
from torch_vkv.serving.server.loop import DEFAULT_MAX_WAITING, EngineLoop, QueueFullError
from torch_vkv.serving.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    StreamOptions,
    TextPart,
)

__all__ = ["EngineLoop", "QueueFullError", "create_app", "main", "serve"]
