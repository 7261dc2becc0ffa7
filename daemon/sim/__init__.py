"""``lattice sim``: a deterministic *simulated* OpenAI-compatible backend (not a real model).

- :mod:`daemon.sim.engine` — pure generation logic (:class:`SimEngine`), usable in-process,
  over :mod:`~daemon.sim.generation` (seeded tokens and logprobs), :mod:`~daemon.sim.chat`,
  :mod:`~daemon.sim.completions` (legacy), :mod:`~daemon.sim.embeddings`,
  :mod:`~daemon.sim.inputs` (request fields they share) and :mod:`~daemon.sim.errors`;
- :mod:`daemon.sim.protocol` — the msgspec wire types it reads and writes;
- :mod:`daemon.sim.app` — the raw ASGI app (:func:`create_app`, :class:`SimConfig`), over
  :mod:`~daemon.sim.asgi` (body reading, JSON and error responses, lifespan);
- :mod:`daemon.sim.server` — that app on uvicorn (:func:`serve`, :func:`main`,
  :class:`SimThread` for tests and benchmarks).

Only the engine and protocol are imported here; the app and the server (and uvicorn) load on
demand.
"""

from daemon.sim.engine import (
    DEFAULT_EMBEDDING_DIM,
    DEFAULT_MODELS,
    Generation,
    SimEngine,
    SimError,
    SimModel,
    embed,
    generate,
)

__all__ = [
    "DEFAULT_EMBEDDING_DIM",
    "DEFAULT_MODELS",
    "Generation",
    "SimEngine",
    "SimError",
    "SimModel",
    "embed",
    "generate",
]
