"""ApiKeyStore and Authenticator (API key paths) against a real Redis."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import redis.asyncio as aioredis

from gateway import keys
from gateway.auth.apikeys import ADMIN_WORKSPACE, INVALID_KEY_MESSAGE, ApiKeyStore, parse_api_key
from gateway.auth.authenticator import MISSING_KEY_MESSAGE, Authenticator
from gateway.auth.principal import DEFAULT_SCOPES, Principal, Scope
from gateway.auth.workspaces import WorkspaceStore
from gateway.errors import AuthenticationFailed, InvalidRequest, NotFound


@pytest.fixture
async def store(aredis: aioredis.Redis) -> ApiKeyStore:
    await WorkspaceStore(aredis).create("acme")
    await WorkspaceStore(aredis).create("beta")
    return ApiKeyStore(aredis)


async def test_create_and_verify(store: ApiKeyStore) -> None:
    token, record = await store.create("acme", name="ci", subject="user-7")
    assert token.startswith(f"sk_{record.id}_")
    assert record.id.startswith("lt") and "_" not in record.id
    parsed = parse_api_key(token)
    assert parsed is not None and len(parsed[1]) >= 43  # token_urlsafe(32)
    assert record.scopes == DEFAULT_SCOPES and record.revoked_at is None
    principal = await store.verify(token)
    assert principal == Principal(
        workspace="acme", subject="user-7", scopes=DEFAULT_SCOPES, kind="api_key", key_id=record.id
    )
    # Served from the in-process cache the second time, same answer.
    assert await store.verify(token) == principal


async def test_subject_defaults_to_the_key(store: ApiKeyStore) -> None:
    token, record = await store.create("acme", scopes=[Scope.INFERENCE, Scope.USAGE_READ])
    principal = await store.verify(token)
    assert principal.subject == f"apikey:{record.id}"
    assert principal.scopes == (Scope.INFERENCE, Scope.USAGE_READ)


async def test_stored_record_holds_only_the_hash(
    store: ApiKeyStore, aredis: aioredis.Redis
) -> None:
    token, record = await store.create("acme", name="ci")
    secret = token.split("_", 2)[2]
    raw = await aredis.hgetall(keys.apikey(record.id))
    blob = repr(raw)  # every field and value, as stored
    assert secret not in blob and token not in blob
    assert set(raw) == {b"id", b"workspace", b"name", b"scopes", b"created", b"secret_sha256"}


async def test_list_has_no_secrets(store: ApiKeyStore) -> None:
    token_a, a = await store.create("acme", name="a")
    token_b, b = await store.create("beta", name="b")
    _, admin = await store.create_admin_key(name="ops")
    assert {r.id for r in await store.list()} == {a.id, b.id, admin.id}
    assert await store.list("acme") == [a]
    assert await store.list("nobody") == []
    assert await store.get(a.id) == a
    for record in await store.list():
        dumped = msgspec.json.encode(record)
        assert b"sha256" not in dumped and b"secret" not in dumped
        assert token_a.split("_", 2)[2].encode() not in dumped
        assert token_b.split("_", 2)[2].encode() not in dumped


async def test_revoke(store: ApiKeyStore, aredis: aioredis.Redis) -> None:
    token, record = await store.create("acme")
    await store.verify(token)
    pubsub = aredis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.EVENTS_CHANNEL)
    try:
        assert await store.revoke(record.id) is True
        message = await pubsub.get_message(timeout=1.0)
        while message is None:
            message = await pubsub.get_message(timeout=1.0)
        assert message["data"] == f"key-revoked:{record.id}".encode()
    finally:
        await pubsub.aclose()
    with pytest.raises(AuthenticationFailed):
        await store.verify(token)
    revoked = await store.get(record.id)
    assert revoked is not None and revoked.revoked_at is not None
    assert await store.revoke(record.id) is True  # idempotent, keeps the first time
    assert (await store.get(record.id)) == revoked
    assert await store.revoke("ltaaaaaaaaaaaa") is False
    assert await store.revoke("not-a-key-id") is False
    assert not await aredis.exists(keys.apikey("ltaaaaaaaaaaaa"))


async def test_revocation_reaches_another_process_within_a_second(
    store: ApiKeyStore, aredis: aioredis.Redis
) -> None:
    other = ApiKeyStore(aredis)  # another gateway process: its own cache, no event listener
    token, record = await store.create("acme")
    assert (await other.verify(token)).key_id == record.id  # now cached in `other`
    await store.revoke(record.id)
    await asyncio.sleep(0.6)
    with pytest.raises(AuthenticationFailed):
        await other.verify(token)


async def test_revocation_event_invalidates_at_once(
    store: ApiKeyStore, aredis: aioredis.Redis
) -> None:
    other = ApiKeyStore(aredis, cache_ttl_s=3600)
    token, record = await store.create("acme")
    await other.verify(token)
    await store.revoke(record.id)
    await other.verify(token)  # stale by design until told
    assert other.handle_event(f"key-revoked:{record.id}".encode()) is True
    assert other.handle_event(b"catalog:changed") is False
    with pytest.raises(AuthenticationFailed):
        await other.verify(token)


async def test_every_rejection_looks_the_same(store: ApiKeyStore) -> None:
    token, record = await store.create("acme")
    revoked_token, revoked = await store.create("acme")
    await store.revoke(revoked.id)
    secret = token.split("_", 2)[2]
    candidates = [
        "sk_garbage",
        f"sk_ltaaaaaaaaaaaa_{secret}",  # well-formed, unknown id
        f"sk_{record.id}_{'x' * len(secret)}",  # wrong secret
        revoked_token,
        token + "x",
    ]
    seen = set()
    for candidate in candidates:
        with pytest.raises(AuthenticationFailed) as info:
            await store.verify(candidate)
        err = info.value
        assert candidate not in str(err) and record.id not in err.message
        seen.add((err.message, err.code, err.status, str(err)))
    assert seen == {(INVALID_KEY_MESSAGE, "invalid_api_key", 401, INVALID_KEY_MESSAGE)}


async def test_create_validates(store: ApiKeyStore) -> None:
    with pytest.raises(NotFound):
        await store.create("nobody")
    with pytest.raises(InvalidRequest):
        await store.create("Bad Name")
    with pytest.raises(InvalidRequest):
        await store.create(ADMIN_WORKSPACE)
    with pytest.raises(InvalidRequest):
        await store.create("acme", scopes=["lattice:compute:everything"])
    with pytest.raises(InvalidRequest):
        await store.create("acme", scopes=[Scope.ADMIN])  # only create_admin_key makes those


async def test_admin_key(store: ApiKeyStore) -> None:
    token, record = await store.create_admin_key(name="bootstrap")
    assert record.workspace == ADMIN_WORKSPACE == "_admin"
    principal = await store.verify(token)
    assert principal.has(Scope.ADMIN) and principal.workspace == "_admin"


async def test_authenticator_dispatch(store: ApiKeyStore) -> None:
    auth = Authenticator(store)
    token, record = await store.create("acme")
    assert (await auth.authenticate(f"Bearer {token}")).key_id == record.id
    assert (await auth.authenticate_headers({"Authorization": f"bearer {token}"})).key_id
    assert (await auth.authenticate_headers({"x-api-key": token})).key_id == record.id
    assert (await auth.authenticate_headers({"X-Api-Key": token})).key_id == record.id
    both = {"authorization": f"Bearer {token}", "x-api-key": "sk_wrong"}
    assert (await auth.authenticate_headers(both)).key_id == record.id

    for missing in (None, "", "Basic dXNlcjpwYXNz", "Bearer "):
        with pytest.raises(AuthenticationFailed) as info:
            await auth.authenticate(missing)
        assert (info.value.code, info.value.message) == ("missing_api_key", MISSING_KEY_MESSAGE)
    with pytest.raises(AuthenticationFailed) as info:
        await auth.authenticate_headers({})
    assert info.value.code == "missing_api_key"

    for bad in ("Bearer hello", "Bearer sk-openai-style", f"Bearer sk_{record.id}_nope"):
        with pytest.raises(AuthenticationFailed) as info:
            await auth.authenticate(bad)
        assert (info.value.code, info.value.message) == ("invalid_api_key", INVALID_KEY_MESSAGE)

    with pytest.raises(AuthenticationFailed) as info:
        await auth.authenticate("Bearer eyJhbGciOiJFUzI1NiJ9.e30.sig")  # no JWT issuers
    assert (info.value.status, info.value.code) == (401, "invalid_token")
