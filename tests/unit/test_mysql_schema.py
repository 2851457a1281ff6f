"""The MySQL schema stays within what both MariaDB (deployed, tested) and MySQL 8 accept."""

from __future__ import annotations

import re

from imfast.backends.mysql import schema_sql

#: MariaDB extensions MySQL 8 refuses with a syntax error.
MARIADB_ONLY = [
    r"ADD\s+(INDEX|KEY|COLUMN|CONSTRAINT)\s+IF\s+NOT\s+EXISTS",
    r"DROP\s+(INDEX|KEY|COLUMN)\s+IF\s+EXISTS",
    r"CREATE\s+(OR\s+REPLACE\s+)?INDEX\s+IF\s+NOT\s+EXISTS",
    r"\bRETURNING\b",
]


def test_the_schema_uses_no_mariadb_only_syntax() -> None:
    script = schema_sql()
    for pattern in MARIADB_ONLY:
        assert re.search(pattern, script, re.IGNORECASE) is None, pattern
