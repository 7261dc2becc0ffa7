"""Personal runtimes: their records, pairing (RFC 8628 device flow and one-time bootstrap
tokens) and the owner's API.

Modules: ``tokens`` (ids and secret formats), ``user_codes`` (RFC 8628 §6.1 codes),
``records`` (:class:`~gateway.runtimes.records.RuntimeRecord` and its hash layout),
``store`` (:class:`~gateway.runtimes.store.RuntimeStore`, the records in Redis),
``device_grants`` (device flow state), ``pairing`` (the OAuth endpoints on authlib),
``approvals`` (approve/deny with guessing limits), ``ratelimit``, ``protocol`` (wire types)
and ``routes`` (Litestar handlers).
"""
