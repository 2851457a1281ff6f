"""Client authentication with JSON Web Tokens.

Guarantees of :class:`TokenVerifier`:

* exactly one algorithm is accepted (``JWT_ALGORITHM``): ``alg: none`` and
  HS/RS confusion are refused because the key type and algorithm are fixed
  by configuration, never read from the token;
* ``exp``, ``aud`` and ``iss`` are required and checked; ``sub`` must be a
  valid user id, the optional ``device`` claim a valid device id;
* the identity a connection acts as comes only from a verified token (or,
  when the operator asked for it, ``INSECURE_DEV_AUTH``).

In embedded mode with no ``JWT_SECRET`` set, :func:`dev_secret` creates a
random secret in the data directory so that ``imfast serve`` and
``imfast token`` agree without any setup.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from imfast.config import ConfigError, Settings
from imfast.protocol.ids import is_valid_id

__all__ = ["DEFAULT_DEVICE", "AuthError", "Identity", "TokenVerifier", "dev_secret", "mint_token"]

DEFAULT_DEVICE = "default"
DEV_SECRET_FILE = "jwt_secret"


class AuthError(Exception):
    """A token was refused; the message says why (safe to show the client)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection is: user, device and when its token expires (epoch s, 0 = never)."""

    user: str
    device: str
    expires_at: float


def dev_secret(data_dir: str) -> str:
    """The embedded node's HS256 secret, created (mode 0600) on first use."""
    path = Path(data_dir) / DEV_SECRET_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    return secret


def _signing_secret(settings: Settings) -> str:
    if settings.jwt_secret:
        return settings.jwt_secret
    return dev_secret(settings.data_dir)


class TokenVerifier:
    """Verifies client tokens according to :class:`Settings` (see module docstring)."""

    def __init__(self, settings: Settings, *, embedded: bool = True) -> None:
        self._algorithm = settings.jwt_algorithm
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self.insecure_dev_auth = settings.insecure_dev_auth
        if self._algorithm == "HS256":
            if not settings.jwt_secret and not embedded:
                raise ConfigError("JWT_SECRET is required (or JWT_PUBLIC_KEY_FILE with RS256)")
            self._key: str | bytes = _signing_secret(settings)
        else:
            if not settings.jwt_public_key_file:
                raise ConfigError(f"JWT_ALGORITHM={self._algorithm} needs JWT_PUBLIC_KEY_FILE")
            try:
                self._key = Path(settings.jwt_public_key_file).read_bytes()
            except OSError as exc:
                raise ConfigError(f"JWT_PUBLIC_KEY_FILE: {exc}") from None

    def verify(self, token: str) -> Identity:
        """The identity in ``token``, or :class:`AuthError` saying why not."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "sub", "aud", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        user = claims.get("sub")
        device = claims.get("device", DEFAULT_DEVICE)
        if not is_valid_id(user):
            raise AuthError("invalid token: `sub` is not a valid user id")
        if not is_valid_id(device):
            raise AuthError("invalid token: `device` is not a valid device id")
        return Identity(str(user), str(device), float(claims["exp"]))

    def dev_identity(self, user: str, device: str | None) -> Identity:
        """INSECURE_DEV_AUTH only: trust a user name given in the URL."""
        if not self.insecure_dev_auth:
            raise AuthError("?user= sign-in is off on this server (INSECURE_DEV_AUTH); "
                            "authenticate with a token (?token= or an auth frame)")
        device = device or DEFAULT_DEVICE
        if not is_valid_id(user) or not is_valid_id(device):
            raise AuthError("invalid user or device id")
        return Identity(user, device, 0.0)


def mint_token(
    settings: Settings, user: str, device: str = DEFAULT_DEVICE, ttl: float = 24 * 3600
) -> str:
    """An HS256 token for ``user``/``device`` signed with the configured secret."""
    if settings.jwt_algorithm != "HS256":
        raise ConfigError("imfast token mints HS256 tokens only; sign RS256 tokens with your IdP")
    if not is_valid_id(user):
        raise ValueError(f"invalid user id {user!r}: 1-64 characters of [A-Za-z0-9_.@-]")
    if not is_valid_id(device):
        raise ValueError(f"invalid device id {device!r}: 1-64 characters of [A-Za-z0-9_.@-]")
    now = int(time.time())
    claims = {
        "sub": user,
        "device": device,
        "aud": settings.jwt_audience,
        "iss": settings.jwt_issuer,
        "iat": now,
        "exp": now + int(ttl),
    }
    return jwt.encode(claims, _signing_secret(settings), algorithm="HS256")
