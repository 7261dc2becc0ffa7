"""User codes of the device flow (RFC 8628 §6.1): generation, display form, normalisation.

A user code is 8 characters of the 20-letter alphabet ``BCDFGHJKLMNPQRSTVWXZ`` (consonants
only: no vowels, so no words, and none of the look-alikes 0/O, 1/I/L-with-digits), shown as
``XXXX-XXXX``. That is 20^8 ≈ 2^34.6 codes: enough, per §6.1, only together with rate limits
on guessing (see ``pairing.py``) and the short lifetime of a code.

The user may type the code in any case, with or without the dash, with spaces: §6.1 asks the
server to be lenient about such input. :func:`normalise_user_code` returns the canonical
8 letters (stored form) or ``None``; :func:`display_user_code` adds the dash back.
"""

from __future__ import annotations

import secrets

__all__ = [
    "USER_CODE_ALPHABET",
    "USER_CODE_LENGTH",
    "display_user_code",
    "new_user_code",
    "normalise_user_code",
]

USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
_ALLOWED = frozenset(USER_CODE_ALPHABET)
_IGNORED = frozenset("-\u2010\u2013 \t")  # separators a person may type or paste (dashes)
_MAX_INPUT = 32


def new_user_code() -> str:
    """A fresh code in display form, ``XXXX-XXXX``, from a CSPRNG."""
    letters = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
    return display_user_code(letters)


def normalise_user_code(text: str) -> str | None:
    """The canonical 8 upper-case letters of what a user typed, else ``None``.

    Case and separators (dashes, spaces) are ignored; any other character, or a wrong
    length, makes the input invalid.
    """
    if not isinstance(text, str) or len(text) > _MAX_INPUT:
        return None
    letters = "".join(c for c in text.upper() if c not in _IGNORED)
    if len(letters) != USER_CODE_LENGTH or not set(letters) <= _ALLOWED:
        return None
    return letters


def display_user_code(code: str) -> str:
    """``XXXX-XXXX`` for a canonical code (or an already displayed one)."""
    letters = code.replace("-", "")
    return f"{letters[:4]}-{letters[4:]}"
