"""Token verification refuses everything but the configured algorithm and claims."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from imfast.auth import AuthError, TokenVerifier, dev_secret, mint_token
from imfast.config import ConfigError, Settings


def test_mint_and_verify_roundtrip(tmp_path: Path) -> None:
    s = Settings(data_dir=str(tmp_path))
    token = mint_token(s, "alice", "phone", ttl=60)
    ident = TokenVerifier(s).verify(token)
    assert (ident.user, ident.device) == ("alice", "phone")
    assert ident.expires_at > time.time()


def test_dev_secret_is_stable_and_private(tmp_path: Path) -> None:
    first = dev_secret(str(tmp_path))
    assert dev_secret(str(tmp_path)) == first and len(first) >= 32
    assert (tmp_path / "jwt_secret").stat().st_mode & 0o077 == 0


def test_distributed_roles_require_a_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        TokenVerifier(Settings(data_dir=str(tmp_path)), embedded=False)


def test_rs256_with_public_key_and_hs_confusion_refused(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(pem)
    s = Settings(jwt_algorithm="RS256", jwt_public_key_file=str(tmp_path / "pub.pem"))
    verifier = TokenVerifier(s, embedded=False)
    claims = {"sub": "alice", "aud": "imfast", "iss": "imfast", "exp": int(time.time()) + 60}
    good = jwt.encode(claims, key, algorithm="RS256")
    assert verifier.verify(good).user == "alice"
    # HS/RS confusion: an HS256 token signed with the public key as the HMAC secret.
    import base64
    import hashlib
    import hmac
    import json

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
    with pytest.raises(AuthError):
        verifier.verify(f"{head}.{body}.{sig}")


def test_invalid_ids_cannot_be_minted(tmp_path: Path) -> None:
    s = Settings(data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="invalid user id"):
        mint_token(s, "a:b")
