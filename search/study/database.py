"""Where a study storage URL points, and whether it can be used, checked before anything trains.

The results directory is writable, an SQLite file is a database and not damaged, a PostgreSQL
server answers within CONNECT_TIMEOUT with an installed driver, a reader never creates a
database: each failure is one UserError line naming the fix. Nothing here imports Optuna;
search.study.storage opens the storage these checks allow.
"""
from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from search.errors import UserError

# how long to wait for a database server before calling it unreachable (seconds)
CONNECT_TIMEOUT = 10
# how long an SQLite writer waits for another worker's lock (seconds)
SQLITE_BUSY_TIMEOUT = 60

DB_NAME = "studies.db"


def default_url(results_dir: str | os.PathLike = "results") -> str:
    """The SQLite URL of the default storage, results/studies.db (absolute, so workers
    started elsewhere find the same file)."""
    return "sqlite:///" + str(Path(results_dir, DB_NAME).resolve())


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def check_exists(url: str | None, results_dir: str | os.PathLike) -> None:
    """Reading never creates a database: a missing SQLite file is a UserError."""
    path = Path(results_dir, DB_NAME) if url is None or not str(url).strip() else None
    if path is None and str(url).strip().lower().startswith("sqlite:///"):
        path = Path(str(url).strip()[len("sqlite:///"):])
    if path is not None and str(path) != ":memory:" and not path.expanduser().exists():
        raise UserError(f"no study storage at {str(path)!r}: run `hwcompress search` first, "
                        "or pass --storage URL / --results-dir DIR where the studies are")


def check_results_dir(path: Path) -> None:
    """Create the results directory and prove we can write in it (os.access lies to root)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(
            f"results directory {str(path)!r} is not writable ({e.strerror or e}): "
            "pass --results-dir with a writable directory, or fix its permissions"
        ) from None


def sqlite_engine(url: str) -> tuple[str, dict]:
    """Check an SQLite URL's file: its directory is writable, and it is a database."""
    path_text = url.split("://", 1)[1]
    if not path_text.startswith("/") or path_text in ("/", "/:memory:"):
        raise UserError(
            f"storage URL {url!r} names no SQLite file: use sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db"
        )
    path = Path(path_text[1:]).expanduser()  # sqlite:///x.db -> x.db, sqlite:////a/x.db -> /a/x.db
    check_results_dir(path.parent)
    if path.is_dir():
        raise UserError(f"SQLite storage {str(path)!r} is a directory: name a file instead")
    if path.exists():
        check_sqlite_file(path)
    return "sqlite:///" + str(path.resolve()), {
        "connect_args": {"timeout": SQLITE_BUSY_TIMEOUT},
    }


def check_sqlite_file(path: Path) -> None:
    """Fail with one line when `path` is not a readable, writable SQLite database."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=SQLITE_BUSY_TIMEOUT)
        try:
            con.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
            ok = con.execute("PRAGMA quick_check").fetchone()
        finally:
            con.close()
    except sqlite3.Error as e:
        raise UserError(
            f"storage file {str(path)!r} is not a usable SQLite database ({e}): "
            "move it aside or pass --storage with another file"
        ) from None
    if not ok or ok[0] != "ok":
        raise UserError(
            f"storage file {str(path)!r} is a damaged SQLite database ({ok[0] if ok else '?'}): "
            "restore it from a backup or move it aside"
        )


def postgres_engine(url: str) -> tuple[str, dict]:
    """Check a PostgreSQL URL and prove the server answers, with a short timeout.

    The URL goes to SQLAlchemy as the user wrote it: `postgresql://...` means SQLAlchemy's
    default driver (psycopg 3 since SQLAlchemy 2.1, what the `postgres` extra installs), so
    the same URL works in optuna.load_study, Optuna's CLI and optuna-dashboard;
    `postgresql+DRIVER://...` picks another installed driver. Only the old spelling
    `postgres://`, which SQLAlchemy refuses, is read as `postgresql://`.
    """
    import sqlalchemy  # local: only PostgreSQL users pay for the dialect lookup

    scheme, rest = url.split("://", 1)
    sql_url = ("postgresql" if scheme.lower() == "postgres" else scheme) + "://" + rest
    parts = urlsplit(sql_url)
    if not parts.path.strip("/"):
        raise UserError(
            f"storage URL {redact(url)!r} names no database: use postgresql://user:pass@host:port/DBNAME"
        )
    try:
        dialect = sqlalchemy.engine.make_url(sql_url).get_dialect()
    except (sqlalchemy.exc.ArgumentError, ValueError) as e:
        raise UserError(
            f"storage URL {redact(url)!r} is not a PostgreSQL URL SQLAlchemy can use ({first_line(e)}): "
            "use postgresql://user:pass@host:port/db"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError:
        raise UserError(
            f"PostgreSQL storage needs the {dialect.driver} driver, which is not installed: "
            + ("pip install 'hwcompress[postgres]'" if dialect.driver == "psycopg"
               else "install it, or use postgresql://... with pip install 'hwcompress[postgres]'")
        ) from None
    engine_kwargs = {
        "pool_pre_ping": True,  # a worker that idled past a server restart reconnects
        "connect_args": {"connect_timeout": CONNECT_TIMEOUT} if dialect.driver in ("psycopg", "psycopg2") else {},
    }
    engine = sqlalchemy.create_engine(sql_url, **engine_kwargs)
    try:
        with engine.connect() as con:
            con.execute(sqlalchemy.text("SELECT 1"))
    except Exception as e:
        reason = first_line(getattr(e, "orig", None) or e)
        host = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
        raise UserError(
            f"cannot reach PostgreSQL storage {redact(url)!r} at {host} ({reason}): "
            "start the server, or check host, port, user, password and database name"
        ) from None
    finally:
        engine.dispose()
    return sql_url, engine_kwargs


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
