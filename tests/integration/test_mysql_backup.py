"""deploy/k8s/mysql-backup.yaml's nightly dump, run as written against a real MariaDB."""

from __future__ import annotations

import gzip
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "mysql-backup.yaml"


def _backup_container() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    job = next(d for d in docs if d["kind"] == "CronJob")
    return job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def test_the_backup_job_dumps_im_chat_whole_and_keeps_a_week(mariadb_server: Any,
                                                             mariadb_app_dsn: str,
                                                             tmp_path: Path) -> None:
    mariadb_server.execute(
        "CREATE TABLE IF NOT EXISTS im_chat.backup_probe (id INT PRIMARY KEY, v TEXT);"
        "REPLACE INTO im_chat.backup_probe VALUES (1, 'kept by the backup');")
    try:
        container = _backup_container()
        script = container["args"][0]
        # The cluster's names for this machine's: the Service `mysql` and root with the
        # Secret's password become the test server and the app user (who owns im_chat).
        assert "-h mysql -u root" in script and "/backup" in script
        script = script.replace("-h mysql -u root",
                                f"-h 127.0.0.1 -P {mariadb_server.port} -u {mariadb_server.APP_USER}")
        script = script.replace("/backup", str(tmp_path))
        env = {e["name"]: e.get("value", "") for e in container["env"]}
        assert env["BACKUP_KEEP_DAYS"] == "7"
        old = tmp_path / "im_chat-20000101T000000Z.sql.gz"
        recent = tmp_path / "im_chat-20991231T000000Z.sql.gz"
        for f in (old, recent):
            f.write_bytes(gzip.compress(b"-- an earlier dump\n"))
        ten_days_ago = time.time() - 10 * 86400
        os.utime(old, (ten_days_ago, ten_days_ago))

        subprocess.run([*container["command"], script], check=True, timeout=120,
                       env={**os.environ, **env, "MYSQL_ROOT_PASSWORD": mariadb_server.APP_PASSWORD},
                       capture_output=True)

        dumps = sorted(p.name for p in tmp_path.iterdir())
        assert old.name not in dumps  # past BACKUP_KEEP_DAYS
        assert recent.name in dumps
        new = [tmp_path / n for n in dumps if n != recent.name]
        assert len(new) == 1 and new[0].name.startswith("im_chat-") and new[0].suffix == ".gz"
        text = gzip.decompress(new[0].read_bytes()).decode()
        assert "CREATE DATABASE" in text and "`backup_probe`" in text
        assert "kept by the backup" in text
        assert text.rstrip().splitlines()[-1].startswith("-- Dump completed")  # whole
    finally:  # the database is shared with the other tests
        mariadb_server.execute("DROP TABLE IF EXISTS im_chat.backup_probe;")
