"""The fake Stripe's HTTP semantics, bytes in and bytes out, without a socket.

:meth:`FakeStripeApi.handle` takes one parsed :class:`Request` and returns the
:class:`Response` Stripe would send: authentication, routing, parameter decoding (form bodies
and query strings on v1, JSON on v2), the idempotency layer on POSTs, and Stripe's error
bodies with a ``Request-Id`` header on every answer. ``server.py`` only moves these over HTTP
and carries out injected failures.

Authentication (https://docs.stripe.com/api/authentication): every ``/v1`` and
``/v2/billing/meter_event_session`` call needs ``Authorization: Bearer sk_test_...`` (or HTTP
Basic with the key as the user name); any test secret key will do, and all share one state.
The stream ``/v2/billing/meter_event_stream`` needs ``Authorization: Bearer <meter event
session token>``. Otherwise 401.

Control endpoints, unauthenticated: ``POST /_fake/fail`` (a ``failures.FailurePlan`` as
JSON), ``POST /_fake/reset`` (forget everything), ``GET /_fake/state`` (the JSON of
:meth:`FakeStripeState.snapshot`, with failure counters).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from billing.fake_stripe.errors import ApiError
from billing.fake_stripe.failures import FailureInjector, FailurePlan
from billing.fake_stripe.forms import decode_form
from billing.fake_stripe.idempotency import StoredResponse
from billing.fake_stripe.state import FakeStripeState

__all__ = ["STREAM_PATH", "Call", "FakeStripeApi", "Request", "Response"]

STREAM_PATH = "/v2/billing/meter_event_stream"
_encode = msgspec.json.Encoder().encode
_decode_plan = msgspec.json.Decoder(FailurePlan).decode


class Call(NamedTuple):
    """What a route handler gets: the path's ids, the decoded params, the credential."""

    ids: tuple[str, ...]
    params: dict[str, Any]
    credential: str


Handler = Callable[[Call], object]


class Request(NamedTuple):
    method: str
    path: str
    query: str
    body: bytes
    authorization: str | None = None
    idempotency_key: str | None = None


class Response(NamedTuple):
    status: int
    body: bytes
    headers: dict[str, str]


class FakeStripeApi:
    """Stripe's answers over :class:`FakeStripeState`; ``base_url`` makes account links."""

    def __init__(
        self,
        state: FakeStripeState,
        failures: FailureInjector | None = None,
        base_url: Callable[[], str] = lambda: "",
    ) -> None:
        self.state = state
        self.failures = failures or FailureInjector()
        self._base_url = base_url
        self._routes = self._build_routes()
        self._exact = {
            (verb, pattern.pattern): handler
            for verb, pattern, handler in self._routes
            if "(" not in pattern.pattern
        }

    def handle(self, request: Request) -> Response:
        request_id = f"req_{secrets.token_hex(7)}"
        if request.path.startswith("/_fake/"):
            return self._control(request, request_id)
        try:
            credential = self._authenticate(request)
            handler, ids = self._route(request.method, request.path)
            call = Call(ids, self._params(request), credential)
            if request.method != "POST" or not request.idempotency_key:
                return self._answer(200, handler(call), request_id)
            return self._idempotent(request, handler, call, request_id)
        except ApiError as exc:
            return self._answer(exc.status, exc.body(), request_id)

    # -- the request pipeline -------------------------------------------------------------------

    def _authenticate(self, request: Request) -> str:
        """The caller's credential (its API key, or its session token on the stream), which
        is also the scope of its idempotency keys."""
        auth = request.authorization or ""
        scheme, _, credential = auth.partition(" ")
        if scheme.lower() == "basic":  # ``curl -u sk_test_...:``, as in Stripe's docs
            credential = _basic_user(credential)
        elif scheme.lower() != "bearer":
            credential = ""
        if not credential.strip():
            raise ApiError(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY').",
            )
        credential = credential.strip()
        if request.path == STREAM_PATH:
            self.state.check_session(credential)
            return credential
        if not credential.startswith("sk_test_") or len(credential) <= len("sk_test_"):
            masked = credential[:8] + "*" * max(len(credential) - 12, 0) + credential[-4:]
            raise ApiError(401, f"Invalid API Key provided: {masked}")
        return credential

    def _route(self, method: str, path: str) -> tuple[Handler, tuple[str, ...]]:
        exact = self._exact.get((method, path))
        if exact is not None:
            return exact, ()
        for verb, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match is not None and verb == method:
                return handler, match.groups()
        raise ApiError(
            404,
            f"Unrecognized request URL ({method}: {path}). Please see https://docs.stripe.com "
            "or we can help at https://support.stripe.com/.",
        )

    def _params(self, request: Request) -> dict[str, Any]:
        if request.method != "POST":
            return decode_form(request.query)
        if request.path.startswith("/v2/"):
            if not request.body:
                return {}
            try:
                body = msgspec.json.decode(request.body)
            except msgspec.DecodeError:
                raise ApiError(400, "Invalid JSON body.", code="invalid_fields") from None
            if not isinstance(body, dict):
                raise ApiError(400, "The JSON body must be an object.", code="invalid_fields")
            return body
        try:
            return decode_form(request.body.decode())
        except UnicodeDecodeError:
            raise ApiError(400, "The request body is not valid UTF-8.") from None

    def _idempotent(
        self,
        request: Request,
        handler: Handler,
        call: Call,
        request_id: str,
    ) -> Response:
        key = request.idempotency_key or ""
        store = self.state.idempotency
        saved = store.lookup(call.credential, key, request.path, call.params)
        if saved is not None:
            headers = self._headers(request_id)
            headers.update(
                {
                    "Idempotency-Key": key,
                    "Idempotent-Replayed": "true",
                    "Original-Request": saved.request_id,
                }
            )
            return Response(saved.status, saved.body, headers)
        response = self._answer(200, handler(call), request_id)
        response.headers["Idempotency-Key"] = key
        stored = StoredResponse(response.status, response.body, request_id)
        store.save(call.credential, key, request.path, call.params, stored)
        return response

    def _answer(self, status: int, payload: object, request_id: str) -> Response:
        return Response(status, _encode(payload), self._headers(request_id))

    @staticmethod
    def _headers(request_id: str) -> dict[str, str]:
        return {"Content-Type": "application/json", "Request-Id": request_id}

    # -- control --------------------------------------------------------------------------------

    def _control(self, request: Request, request_id: str) -> Response:
        try:
            if request.method == "POST" and request.path == "/_fake/fail":
                self.failures.arm(_decode_plan(request.body or b"{}"))
                return self._answer(200, {"pending": self.failures.pending()}, request_id)
            if request.method == "POST" and request.path == "/_fake/reset":
                self.state.reset()
                self.failures.clear()
                return self._answer(200, {"reset": True}, request_id)
            if request.method == "GET" and request.path == "/_fake/state":
                snapshot = self.state.snapshot()
                snapshot["failures_pending"] = self.failures.pending()
                snapshot["failures_injected"] = self.failures.injected
                return self._answer(200, snapshot, request_id)
        except msgspec.ValidationError as exc:
            return self._answer(
                400, ApiError(400, f"Invalid failure plan: {exc}").body(), request_id
            )
        except msgspec.DecodeError as exc:
            return self._answer(400, ApiError(400, f"Invalid JSON: {exc}").body(), request_id)
        error = ApiError(404, f"Unknown control endpoint ({request.method}: {request.path}).")
        return self._answer(404, error.body(), request_id)

    # -- routes ---------------------------------------------------------------------------------

    def _build_routes(self) -> list[tuple[str, re.Pattern[str], Handler]]:
        s = self.state  # reset() clears it in place, so these closures stay valid
        table: list[tuple[str, str, Handler]] = [
            ("POST", "/v1/customers", lambda r: s.create_customer(r.params)),
            ("GET", "/v1/customers", lambda r: s.list_customers(r.params)),
            ("GET", "/v1/customers/search", lambda r: s.search_customers(r.params)),
            ("GET", "/v1/customers/{id}", lambda r: s.retrieve_customer(r.ids[0])),
            ("DELETE", "/v1/customers/{id}", lambda r: s.delete_customer(r.ids[0])),
            ("GET", "/v1/billing/meters", lambda r: s.list_meters(r.params)),
            ("POST", "/v1/billing/meters", lambda r: s.create_meter(r.params)),
            ("GET", "/v1/billing/meters/{id}", lambda r: s.retrieve_meter(r.ids[0])),
            ("POST", "/v1/billing/meters/{id}/deactivate", lambda r: s.deactivate_meter(r.ids[0])),
            (
                "GET",
                "/v1/billing/meters/{id}/event_summaries",
                lambda r: s.event_summaries(r.ids[0], r.params),
            ),
            ("POST", "/v1/billing/meter_events", lambda r: s.create_meter_event(r.params)),
            (
                "POST",
                "/v2/billing/meter_event_session",
                lambda r: s.create_meter_event_session(),
            ),
            ("POST", STREAM_PATH, lambda r: s.stream_meter_events(r.credential, r.params)),
            ("POST", "/v1/accounts", lambda r: s.connect.create_account(r.params)),
            ("GET", "/v1/accounts", lambda r: s.connect.list_accounts(r.params)),
            ("GET", "/v1/accounts/{id}", lambda r: s.connect.retrieve_account(r.ids[0])),
            (
                "POST",
                "/v1/account_links",
                lambda r: s.connect.create_account_link(r.params, self._base_url()),
            ),
            ("POST", "/v1/transfers", lambda r: s.connect.create_transfer(r.params)),
            ("GET", "/v1/transfers", lambda r: s.connect.list_transfers(r.params)),
            ("GET", "/v1/transfers/{id}", lambda r: s.connect.retrieve_transfer(r.ids[0])),
        ]
        return [
            (verb, re.compile(path.replace("{id}", "([^/]+)")), handler)
            for verb, path, handler in table
        ]


def _basic_user(credential: str) -> str:
    """The user part of HTTP Basic credentials (RFC 7617), where Stripe takes the key."""
    try:
        decoded = base64.b64decode(credential.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[0]
