"""The app factory: ``create_app(settings)`` builds a Litestar app around one
:class:`~gateway.runtime.Gateway`. No import-time side effects; ``create_app_from_env`` is
the factory uvicorn workers call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar, Response, get
from litestar.handlers import BaseRouteHandler
from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.admin.routes import admin_routes
from gateway.admin.spend_routes import spend_admin_routes
from gateway.front.serve import FrontDoor
from gateway.http import exception_to_response, json_response, request_context_middleware
from gateway.logs import configure_logging
from gateway.openai.dispatch_app import dispatch_app
from gateway.openai.routes import openai_routes
from gateway.runtime import Gateway
from gateway.runtimes.routes import runtime_routes
from gateway.settings import Settings, settings_from_env
from gateway.tunnel.routes import tunnel_routes
from gateway.usage_routes import usage_routes

__all__ = ["LatticeApp", "create_app", "create_app_from_env"]


class LatticeApp:
    """The gateway's ASGI app, carrying the dispatch routes' front door
    (:mod:`gateway.front`) for the server protocol that can use it."""

    def __init__(self, asgi: ASGIApp, front: FrontDoor) -> None:
        self._asgi = asgi
        self.lattice_front = front

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._asgi(scope, receive, send)


def _health_routes(gw: Gateway) -> list[BaseRouteHandler]:
    @get("/healthz")
    async def healthz() -> Response[bytes]:
        return json_response(b'{"status":"ok"}')

    @get("/readyz")
    async def readyz() -> Response[bytes]:
        if await gw.ready():
            version = gw.catalog.current.version
            return json_response(b'{"status":"ready","catalog_version":%d}' % version)
        return json_response(b'{"status":"not ready"}', 503)

    @get("/metrics")
    async def metrics() -> Response[bytes]:
        return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return [healthz, readyz, metrics]


def create_app(settings: Settings, *, gateway: Gateway | None = None) -> LatticeApp:
    """The gateway as an ASGI app: the request-context middleware (request id, metrics,
    access log — around everything, so even a 404 carries its ``x-request-id``), then the
    dispatch routes (:mod:`gateway.openai.dispatch_app`), then Litestar for the rest. Under
    ``lattice serve`` the dispatch routes are served by the front door (:mod:`gateway.front`)
    before ASGI; the same routes stay here for any other server and for what the front
    door passes on."""
    gw = gateway or Gateway(settings)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = Litestar(
        route_handlers=[
            *_health_routes(gw),
            *openai_routes(gw),
            *admin_routes(gw),
            *runtime_routes(gw),
            *tunnel_routes(gw.tunnels),
            *usage_routes(gw),
            *spend_admin_routes(gw),
        ],
        exception_handlers={Exception: exception_to_response},
        lifespan=[lifespan],
        openapi_config=None,
        request_max_body_size=settings.max_body_bytes,
        logging_config=None,
        debug=False,
    )
    app.state.gateway = gw
    dispatch = dispatch_app(gw)(app)
    return LatticeApp(request_context_middleware(gw.metrics)(dispatch), FrontDoor(gw))


def create_app_from_env() -> LatticeApp:
    settings = settings_from_env()
    configure_logging(settings.log_level, settings.log_json)
    return create_app(settings)
