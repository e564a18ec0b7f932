"""``python -m torch_vkv bench serve``: the serving benchmark.

With ``--url`` it is the load client (:mod:`.serve_client`): the workloads of
:mod:`.workloads` sent to any OpenAI-compatible server over HTTP. The
in-process mode (the engine driven directly, virtual vs paged side by side)
is not implemented yet; it reuses :mod:`.workloads` and
:func:`.serve_client.summarize` for the same report.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch_vkv.bench import serve_client


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = serve_client.build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.url is None and not any(a in ("-h", "--help") for a in (argv or ())):
        parser.error(
            "without --url this would run the engine in process, which is not implemented yet; "
            "start a server (python -m torch_vkv serve --model PATH) and pass --url http://HOST:PORT"
        )
    return serve_client.main(argv, parser)
