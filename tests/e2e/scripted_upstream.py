"""A real HTTP server on loopback that misbehaves on purpose, for the gateway's failure tests.

What it does depends on the upstream ``model`` the gateway sends (the offering's
``upstream.model``): ``status-500``, ``status-429``, ``status-422``, ``status-401`` answer that
status; ``slow`` sleeps past the gateway's timeout; ``bad-json`` answers 200 with garbage;
``record`` answers a valid chat completion and records the body it received;
``slow-stream`` streams one chunk every 50 ms and records when the client went away;
``die-mid-stream`` sends two chunks and drops the connection; ``deep-json`` answers 200 with
JSON nested deeper than any decoder follows, and ``deep-stream`` streams one good chunk, then
such an event. ``POST /v1/images`` serves the
catalog-defined ``image-generation`` task class. ``GET /jwks.json`` serves a JWKS.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from aiohttp import web

from gateway.redis_server import free_port

#: A JSON document nested far deeper than decoders follow (they raise RecursionError).
_DEEP = b'{"choices": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"


def _completion(model: str, text: str = "ok") -> dict[str, Any]:
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


def _chunk(model: str, content: str | None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    body = {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class ScriptedUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[dict[str, Any]] = []
        self.disconnects: list[float] = []
        self.stream_chunks_sent = 0
        self.jwks: dict[str, Any] = {"keys": []}
        self.jwks_hits = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        app.router.add_post("/v1/images", self._images)
        app.router.add_get("/jwks.json", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_hits += 1
        return web.json_response(self.jwks)

    async def _images(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(body)
        return web.json_response(
            {"created": int(time.time()), "data": [{"url": f"sim://image/{body.get('prompt')}"}]}
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = str(body.get("model"))
        if model.startswith("status-"):
            status = int(model.split("-", 1)[1])
            headers = {"retry-after": "7"} if status == 429 else {}
            return web.json_response(
                {"error": {"message": f"scripted {status}", "type": "x", "code": None}},
                status=status,
                headers=headers,
            )
        if model == "slow":
            await asyncio.sleep(5)
            return web.json_response(_completion(model))
        if model == "bad-json":
            return web.Response(body=b"{not json", content_type="application/json")
        if model == "deep-json":
            return web.Response(body=_DEEP, content_type="application/json")
        if model == "deep-stream":
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(_chunk(model, "ok"))
            await resp.write(b"data: " + _DEEP + b"\n\n")
            await resp.write(_chunk(model, None, "stop"))
            await resp.write(b"data: [DONE]\n\n")
            return resp
        if model == "record":
            self.received.append(body)
            if body.get("stream"):
                resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
                await resp.prepare(request)
                await resp.write(_chunk(model, "ok"))
                await resp.write(_chunk(model, None, "stop"))
                await resp.write(b"data: [DONE]\n\n")
                return resp
            return web.json_response(_completion(model))
        if model in ("slow-stream", "die-mid-stream"):
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            try:
                for i in range(200):
                    await resp.write(_chunk(model, f" t{i}"))
                    self.stream_chunks_sent += 1
                    if model == "die-mid-stream" and i == 1:
                        assert request.transport is not None
                        request.transport.close()
                        return resp
                    await asyncio.sleep(0.05)
            except (ConnectionResetError, asyncio.CancelledError):
                self.disconnects.append(time.monotonic())
                raise
            return resp
        return web.json_response(_completion(model))
