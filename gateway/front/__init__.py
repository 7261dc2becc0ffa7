"""The gateway's HTTP/1.1 front door: uvicorn's httptools protocol, with the dispatch routes
served without going through ASGI (:mod:`gateway.front.protocol`)."""
