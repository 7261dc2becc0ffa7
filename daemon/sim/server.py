"""Running the simulated backend: ``lattice sim`` on uvicorn, or on a thread in-process.

``lattice sim`` serves the simulator's ASGI app (:mod:`daemon.sim.app`, over
:class:`daemon.sim.engine.SimEngine`) on uvicorn (uvloop + httptools, no access log) so tests,
benchmarks and ``lattice up`` have an upstream when no real backend is configured. It is a
simulator: the text is deterministic filler, not a model's answer. :func:`serve` blocks and
prints one line when listening; :class:`SimThread` runs it on a background thread for tests
and benchmarks in one process; :func:`main` is the CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
import time

import uvicorn

from daemon.sim.app import SimApp, SimConfig, create_app
from daemon.sim.engine import DEFAULT_EMBEDDING_DIM, DEFAULT_MODELS, SimModel

__all__ = ["SimThread", "config_from_args", "main", "serve"]


class _Server(uvicorn.Server):
    announce = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.announce:
            print(
                f"lattice sim: simulated OpenAI-compatible backend on {_base_url(self)}", flush=True
            )


def _base_url(server: uvicorn.Server) -> str:
    host = server.config.host
    port = server.config.port
    for listener in getattr(server, "servers", []):
        for sock in listener.sockets:
            port = sock.getsockname()[1]
    return f"http://{host}:{port}/v1"


def _build(host: str, port: int, config: SimConfig) -> _Server:
    return _Server(
        uvicorn.Config(
            create_app(config),
            host=host,
            port=port,
            http="httptools",
            loop="uvloop",
            lifespan="off",
            access_log=False,
            log_level="warning",
        )
    )


def serve(host: str = "127.0.0.1", port: int = 9100, config: SimConfig | None = None) -> None:
    """Serve the simulator until interrupted (blocking); prints one line when listening."""
    server = _build(host, port, config or SimConfig())
    server.announce = True
    server.run()


class SimThread:
    """The simulator on a background thread, for tests and benchmarks in one process.

    ``port=0`` picks a free port; ``base_url`` is known once :meth:`start` returns.
    """

    def __init__(
        self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._server = _build(host, port, config or SimConfig())
        self._thread = threading.Thread(target=self._server.run, name="lattice-sim", daemon=True)

    @property
    def app(self) -> SimApp:
        app = self._server.config.app
        assert isinstance(app, SimApp)
        return app

    @property
    def base_url(self) -> str:
        return _base_url(self._server)

    def start(self, timeout: float = 10.0) -> SimThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("lattice sim did not start")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> SimThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lattice sim",
        description="Run a deterministic simulated OpenAI-compatible backend (not a real model).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument(
        "--token-delay-ms",
        type=float,
        default=0.0,
        help="delay before each streamed decode step (default 0)",
    )
    parser.add_argument(
        "--api-key", default=None, help="require `Authorization: Bearer KEY` on every request"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="NAME",
        help="a chat/completions model (repeatable; replaces the default)",
    )
    parser.add_argument(
        "--embedding-model",
        action="append",
        default=None,
        metavar="NAME",
        help="an embedding model (repeatable; replaces the default)",
    )
    parser.add_argument("--embedding-dim", type=int, default=DEFAULT_EMBEDDING_DIM)
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    text = [m for m in DEFAULT_MODELS if m.kind == "text"]
    embedding = [m for m in DEFAULT_MODELS if m.kind == "embedding"]
    if args.model:
        text = [SimModel(name) for name in args.model]
    if args.embedding_model:
        embedding = [SimModel(name, kind="embedding") for name in args.embedding_model]
    return SimConfig(
        models=(*text, *embedding),
        token_delay_ms=args.token_delay_ms,
        api_key=args.api_key,
        embedding_dim=args.embedding_dim,
    )


def main(argv: list[str] | None = None) -> int:
    """``lattice sim``: parse flags, serve until interrupted, return the exit code."""
    args = _parser().parse_args(argv)
    if args.embedding_dim < 1 or args.token_delay_ms < 0:
        print("lattice sim: --embedding-dim must be >= 1, --token-delay-ms >= 0", file=sys.stderr)
        return 2
    # uvicorn re-raises SIGINT once its graceful shutdown is done: that is a clean exit.
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.host, args.port, config_from_args(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
