"""Where a daemon's results come from: local OpenAI-compatible servers, the in-process
simulator, and per-task HTTP endpoints, behind one :class:`~daemon.backends.base.Backend`.

- :mod:`~daemon.backends.base` — the protocol, :class:`Advertisement`, :class:`BackendReply`;
- :mod:`~daemon.backends.errors` — the typed failures (status + OpenAI error envelope);
- :mod:`~daemon.backends.mapping` — catalog names ↔ local model names, what is advertised;
- :mod:`~daemon.backends.openai_compat` — Ollama, llama.cpp server, vLLM, LM Studio; ``detect``;
- :mod:`~daemon.backends.sim` — the simulator in-process;
- :mod:`~daemon.backends.http_task` — task class → local URL (e.g. ``image-generation``);
- :mod:`~daemon.backends.composite` — routing by (task, model) across several of them;
- :mod:`~daemon.backends.sse` and :mod:`~daemon.backends.http_client` — plumbing.

:func:`build_backends` turns a :class:`BackendSpec` (the daemon's configuration) into one
backend: ``kind="auto"`` uses the local servers :func:`detect` finds, else the simulator;
``"openai"`` a given ``base_url`` (or the detected servers, and fails if there are none);
``"sim"`` the simulator. ``task_urls`` adds an :class:`HttpTaskBackend` to any of them.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from daemon.backends.base import Advertisement, Backend, BackendReply
from daemon.backends.composite import DEFAULT_CONCURRENCY, CompositeBackend
from daemon.backends.errors import (
    BackendError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    BadBackendReply,
    StreamingNotSupported,
    UnsupportedModel,
    UnsupportedTask,
)
from daemon.backends.http_client import HttpTimeouts
from daemon.backends.http_task import HttpTaskBackend
from daemon.backends.mapping import ModelMap
from daemon.backends.openai_compat import (
    DEFAULT_PORTS,
    DetectedServer,
    OpenAICompatBackend,
    detect,
)
from daemon.backends.sim import SimBackend

__all__ = [
    "DEFAULT_PORTS",
    "Advertisement",
    "Backend",
    "BackendError",
    "BackendRejected",
    "BackendReply",
    "BackendSpec",
    "BackendTimeout",
    "BackendUnavailable",
    "BadBackendReply",
    "CompositeBackend",
    "DetectedServer",
    "HttpTaskBackend",
    "ModelMap",
    "OpenAICompatBackend",
    "SimBackend",
    "StreamingNotSupported",
    "UnsupportedModel",
    "UnsupportedTask",
    "build_backends",
    "detect",
]


class BackendSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The daemon's backend configuration (read by ``daemon/config.py``).

    ``model_map`` holds ``CANONICAL=LOCAL`` pairs; ``default_model`` (canonical or local) is
    what ``lattice:personal:lat_<id>`` runs; ``task_urls`` maps task classes to local HTTP
    endpoints; ``detect_ports``/``detect_host`` are where ``auto`` looks.
    """

    kind: Literal["auto", "openai", "sim"] = "auto"
    base_url: str | None = None
    api_key: str | None = None
    model_map: tuple[str, ...] = ()
    task_urls: dict[str, str] = msgspec.field(default_factory=dict)
    default_model: str | None = None
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=65536)] = DEFAULT_CONCURRENCY
    sim_token_delay_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    detect_ports: tuple[int, ...] = DEFAULT_PORTS
    detect_host: str = "127.0.0.1"
    detect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 0.3


async def build_backends(spec: BackendSpec) -> CompositeBackend:
    """One backend for ``spec`` (see the module docstring). Async because ``auto`` probes
    the local ports; ``ValueError`` for a bad mapping or URL, :class:`BackendUnavailable`
    for ``openai`` without any server."""
    model_map = ModelMap.from_pairs(spec.model_map)
    timeouts = HttpTimeouts(spec.request_timeout_s, spec.connect_timeout_s)
    base_urls: list[str] = []
    if spec.base_url is not None and spec.kind != "sim":
        base_urls = [spec.base_url]
    elif spec.kind != "sim":
        found = await detect(
            spec.detect_ports, spec.detect_host, spec.detect_timeout_s, api_key=spec.api_key
        )
        base_urls = [server.base_url for server in found]
        if not base_urls and spec.kind == "openai":
            ports = ", ".join(map(str, spec.detect_ports))
            raise BackendUnavailable(
                f"No OpenAI-compatible server answered on {spec.detect_host} ports {ports}."
            )
    backends: list[Backend] = [
        OpenAICompatBackend(
            url,
            api_key=spec.api_key,
            model_map=model_map,
            default_model=spec.default_model,
            concurrency=spec.concurrency,
            timeouts=timeouts,
        )
        for url in base_urls
    ]
    if not backends:
        backends.append(
            SimBackend(
                token_delay_ms=spec.sim_token_delay_ms,
                model_map=model_map,
                default_model=spec.default_model,
                concurrency=spec.concurrency,
            )
        )
    if spec.task_urls:
        backends.append(
            HttpTaskBackend(
                spec.task_urls,
                model_map=model_map,
                concurrency=spec.concurrency,
                timeouts=timeouts,
            )
        )
    return CompositeBackend(backends, concurrency=spec.concurrency)
