"""The command line refuses bad flags with a clear message, as the settings refuse bad
environment variables, and never mints a token with a secret the node does not have."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imfast.cli import main


@pytest.mark.parametrize("argv,message", [
    (["serve", "--port", "99999"], "'99999' must be a port number 0-65535"),
    (["serve", "--port", "-1"], "'-1' must be a port number 0-65535"),
    (["serve", "--port", "abc"], "'abc' must be a port number 0-65535"),
    (["serve", "--workers", "0"], "'0' must be a positive whole number"),
    (["gateway", "--workers", "-1"], "'-1' must be a positive whole number"),
    (["service", "--port", "65536"], "'65536' must be a port number 0-65535"),
    (["token", "bob", "--ttl", "-5"], "'-5' must be a positive number"),
    (["token", "bob", "--ttl", "inf"], "'inf' must be a positive number"),
    (["token", "bob", "--ttl", "nan"], "'nan' must be a positive number"),
])
def test_bad_flags_are_refused_with_the_reason(argv: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_token_for_a_data_dir_that_does_not_exist_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("JWT_SECRET", raising=False)
    missing = tmp_path / "typo"
    assert main(["token", "bob", "--data-dir", str(missing)]) == 2
    assert "no data dir" in capsys.readouterr().err and not missing.exists()
    (tmp_path / "data").mkdir()
    assert main(["token", "bob", "--data-dir", str(tmp_path / "data")]) == 0
    assert capsys.readouterr().out.count(".") == 2  # a JWT: header.claims.signature
    assert (tmp_path / "data" / "jwt_secret").exists()  # the node will sign with it too


def test_config_piped_into_a_reader_that_stops_early_exits_quietly() -> None:
    out = subprocess.run(f"{sys.executable} -m imfast config | head -1", shell=True, check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("HOST") and "Traceback" not in out.stderr, out.stderr
