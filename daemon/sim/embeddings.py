"""``POST /v1/embeddings``: unit vectors (L2 norm 1) from SHAKE-256 of the input, rounded to
float32 so the ``float`` and ``base64`` encodings carry the same numbers.

Prompt tokens are the words of a text input, or the length of a token array.
"""

from __future__ import annotations

import array
import base64
import hashlib
import math
import sys

from daemon.sim.errors import SimError
from daemon.sim.inputs import text_or_tokens
from daemon.sim.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage

__all__ = ["embed", "embeddings"]


def embed(text_key: str, dim: int, dimensions: int | None = None) -> list[float]:
    """A deterministic unit vector for an input (``dimensions`` truncates and renormalises)."""
    raw = hashlib.shake_256(text_key.encode()).digest(4 * dim)
    ints = array.array("i", raw)
    if sys.byteorder == "big":
        ints.byteswap()
    values = [x / 2147483648.0 for x in ints[: dimensions or dim]]
    norm = math.hypot(*values) or 1.0
    return array.array("f", [x / norm for x in values]).tolist()


def embeddings(req: EmbeddingRequest, dim: int) -> EmbeddingResponse:
    """Unit vectors of ``dim`` (or ``req.dimensions``) for every input, as floats or base64
    float32 (``encoding_format``); the model is checked by the caller."""
    if req.dimensions is not None and req.dimensions > dim:
        raise SimError(
            400, f"dimensions must be at most {dim} for `{req.model}`.", param="dimensions"
        )
    data: list[EmbeddingData] = []
    tokens = 0
    for i, item in enumerate(text_or_tokens(req.input, "input")):
        if isinstance(item, str):
            if not item:
                raise SimError(400, "'$.input' is invalid: empty string.", param="input")
            key, tokens = f"{req.model}\x00s\x00{item}", tokens + len(item.split())
        else:
            key, tokens = f"{req.model}\x00t\x00{item}", tokens + len(item)
        vector = embed(key, dim, req.dimensions)
        value = _float32_base64(vector) if req.encoding_format == "base64" else vector
        data.append(EmbeddingData(embedding=value, index=i))
    return EmbeddingResponse(
        data=data,
        model=req.model,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _float32_base64(vector: list[float]) -> str:
    # The OpenAI SDK decodes base64 embeddings as little-endian float32.
    packed = array.array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()
