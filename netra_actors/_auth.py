"""Tokens: HS256 JWTs naming a user, with an expiry.

The signing secret is ``NETRA_ACTORS_SECRET`` (``Config.secret``) or else the
file ``secret`` in the data folder, created owner-readable only by whichever
of ``serve`` or ``token`` runs first, so both always agree.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import jwt

from ._config import Config
from ._exceptions import AuthError

ALGORITHM = "HS256"
SECRET_FILE = "secret"
#: Longest token lifetime accepted: ten years.
MAX_TTL = 10 * 365 * 86_400.0


def load_secret(config: Config) -> bytes:
    """The signing secret of ``config``, creating the secret file on first use.

    The file is created with ``O_EXCL`` and mode 0600, so two processes
    starting at once agree on one secret and no other user can read it.
    """
    if config.secret:
        return config.secret.encode()
    path = Path(config.data_dir) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_bytes().strip()
        if not value:
            raise AuthError("no_secret", f"secret file {path} is empty") from None
        return value
    with os.fdopen(fd, "wb") as handle:
        value = secrets.token_hex(32).encode()
        handle.write(value)
    return value


def issue_token(
    user_id: str, secret: bytes, *, ttl: float = 86_400.0, now: float | None = None
) -> str:
    """A token for ``user_id`` that expires ``ttl`` seconds from ``now``."""
    if not user_id:
        raise ValueError("user_id must not be empty")
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be more than 0 and at most {MAX_TTL:g} seconds, got {ttl}")
    issued = int(time.time() if now is None else now)
    claims = {"sub": user_id, "iat": issued, "exp": issued + int(ttl)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(token: str | None, secret: bytes) -> str:
    """The user id a valid token names.

    Raises:
        AuthError: ``reason`` is ``missing``, ``expired`` or ``invalid`` (malformed,
            bad signature, wrong algorithm, no user).
    """
    if not token:
        raise AuthError("missing", "no token given")
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]}
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("expired", "token has expired") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError("invalid", f"token is invalid: {exc}") from None
    user_id = claims.get("sub")
    if not isinstance(user_id, str) or not user_id:
        raise AuthError("invalid", "token names no user")
    return user_id
