"""``lattice sim``: a deterministic *simulated* OpenAI-compatible backend (not a real model).

- :mod:`daemon.sim.engine` — pure generation logic (:class:`SimEngine`), usable in-process;
- :mod:`daemon.sim.protocol` — the msgspec wire types it reads and writes;
- :mod:`daemon.sim.server` — a raw ASGI app on uvicorn (:func:`create_app`, :func:`serve`,
  :func:`main`, :class:`SimThread` for tests and benchmarks).

Only the engine and protocol are imported here; the server (and uvicorn) load on demand.
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
