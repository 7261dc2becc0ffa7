"""The simulator's engine: deterministic fake generation in OpenAI's shapes (pure, no I/O).

This is a *simulator*, not a model. Output is a pure function of the request:

- text: :mod:`daemon.sim.generation` draws each choice's words from a PRNG seeded by a hash of
  the model, prompt, seed and choice index (same request, same words, in every process);
- chat (:mod:`daemon.sim.chat`), legacy completions (:mod:`daemon.sim.completions`) and
  embeddings (:mod:`daemon.sim.embeddings`) render it in OpenAI's shapes;
- :class:`SimEngine` (here) holds the model list and routes a request to them after checking
  that its model exists and is of the right kind.

No clock and no randomness from the outside: the caller passes ``id`` and ``created``.
Streaming builders return an iterator of *steps*: the first step is sent at once (role/echo
chunks), each later step is one decode step (one token per choice), which is where a server
puts its per-token delay. Validation errors raise before the iterator is returned.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import msgspec

from daemon.sim.chat import chat_completion, chat_steps, plan_chat
from daemon.sim.completions import completion, completion_steps, plan_completion
from daemon.sim.embeddings import embed, embeddings
from daemon.sim.errors import SimError
from daemon.sim.generation import MAX_GENERATED_TOKENS as MAX_GENERATED_TOKENS
from daemon.sim.generation import NATURAL_LENGTH as NATURAL_LENGTH
from daemon.sim.generation import VOCABULARY, Generation, generate
from daemon.sim.inputs import SYSTEM_FINGERPRINT
from daemon.sim.protocol import (
    ChatChunk,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)

__all__ = [
    "DEFAULT_EMBEDDING_DIM",
    "DEFAULT_MODELS",
    "OWNED_BY",
    "SYSTEM_FINGERPRINT",
    "VOCABULARY",
    "Generation",
    "SimEngine",
    "SimError",
    "SimModel",
    "embed",
    "generate",
]

OWNED_BY = "lattice-sim"
MODEL_CREATED = 1735689600  # 2025-01-01, fixed: the engine has no clock
DEFAULT_EMBEDDING_DIM = 384


class SimModel(msgspec.Struct, frozen=True):
    """A simulated model: ``kind="text"`` serves chat and completions, ``"embedding"`` embeds."""

    id: str
    kind: Literal["text", "embedding"] = "text"


DEFAULT_MODELS: tuple[SimModel, ...] = (
    SimModel("llama-3.2-3b-instruct"),
    SimModel("all-minilm-l6-v2", kind="embedding"),
)


class SimEngine:
    """Serves the simulated OpenAI surface over a model list (see the module docstring)."""

    def __init__(
        self,
        models: Sequence[SimModel] = DEFAULT_MODELS,
        embedding_dim: int = DEFAULT_EMBEDDING_DIM,
    ) -> None:
        self.models = {m.id: m for m in models}
        self.embedding_dim = embedding_dim
        self._model_list = ModelList(
            data=[ModelCard(id=m.id, created=MODEL_CREATED, owned_by=OWNED_BY) for m in models]
        )

    def list_models(self) -> ModelList:
        return self._model_list

    def chat(self, req: ChatCompletionRequest, *, id: str, created: int) -> ChatCompletion:
        """A ``chat.completion`` for ``req``."""
        self._model(req.model, "text")
        return chat_completion(plan_chat(req), id=id, created=created)

    def chat_stream(
        self, req: ChatCompletionRequest, *, id: str, created: int
    ) -> Iterator[list[ChatChunk]]:
        """Steps of ``chat.completion.chunk``s; validation errors raise before it is returned."""
        self._model(req.model, "text")
        return chat_steps(plan_chat(req), req, id=id, created=created)

    def completion(self, req: CompletionRequest, *, id: str, created: int) -> Completion:
        """A ``text_completion`` for ``req`` (choice ``k`` answers prompt ``k // n``)."""
        self._model(req.model, "text")
        return completion(plan_completion(req), req, id=id, created=created)

    def completion_stream(
        self, req: CompletionRequest, *, id: str, created: int
    ) -> Iterator[list[Completion]]:
        """Steps of streamed ``text_completion`` chunks (same shape as the full response)."""
        self._model(req.model, "text")
        return completion_steps(plan_completion(req), req, id=id, created=created)

    def embeddings(self, req: EmbeddingRequest) -> EmbeddingResponse:
        """Unit vectors for every input, as floats or base64 float32 (``encoding_format``)."""
        self._model(req.model, "embedding")
        return embeddings(req, self.embedding_dim)

    def _model(self, name: str, kind: Literal["text", "embedding"]) -> SimModel:
        model = self.models.get(name)
        if model is None:
            raise SimError(
                404,
                f"The model `{name}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        if model.kind != kind:
            what = "an embedding" if kind == "embedding" else "a text-generation"
            raise SimError(400, f"The model `{name}` is not {what} model.", param="model")
        return model
