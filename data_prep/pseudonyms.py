"""Pseudonyms: subjects are known in a store only by a salted HMAC of their original key.

    from data_prep.pseudonyms import load_salt, pseudonym   # also importable from data_prep.store
    salt = load_salt()                  # $THIGHMRI_SALT, or load_salt("salt.txt")
    pseudonym(salt, "oai", patient_id)  # 16 hex digits

The salt never enters a store; reuse the same salt for every build so that pseudonyms stay
the same across stores.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

SALT_ENV = "THIGHMRI_SALT"
MIN_SALT_CHARS = 16


class SaltError(RuntimeError):
    """No usable pseudonymisation salt."""


def load_salt(salt_file: str | os.PathLike | None = None) -> bytes:
    """The pseudonymisation salt from `salt_file`, else from $THIGHMRI_SALT.

    Raises:
        SaltError: with instructions when neither is set or the salt is too short.
    """
    if salt_file is not None:
        path = Path(salt_file)
        if not path.is_file():
            raise SaltError(f"Salt file {path} does not exist.")
        salt = path.read_text(encoding="utf-8").strip()
        where = f"salt file {path}"
    else:
        salt = os.environ.get(SALT_ENV, "").strip()
        where = f"${SALT_ENV}"
    if not salt:
        raise SaltError(
            f"No pseudonymisation salt: set {SALT_ENV} or pass --salt-file FILE. Create one "
            "once with\n  python -c \"import secrets; print(secrets.token_hex(32))\" > salt.txt\n"
            "keep it outside the store and outside version control, and reuse it for every "
            "build so that pseudonyms stay the same across stores.")
    if len(salt) < MIN_SALT_CHARS:
        raise SaltError(f"The salt in {where} has {len(salt)} characters; use at least "
                        f"{MIN_SALT_CHARS} (e.g. secrets.token_hex(32)).")
    return salt.encode("utf-8")


def pseudonym(salt: bytes, cohort: str, key: str) -> str:
    """First 16 hex digits of HMAC-SHA256(salt, "<cohort>:<original key>")."""
    msg = f"{cohort}:{key}".encode()
    return hmac.new(salt, msg, hashlib.sha256).hexdigest()[:16]
