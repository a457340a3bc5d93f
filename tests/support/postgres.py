"""A throw-away PostgreSQL server for the tests: ``initdb`` + ``pg_ctl`` in a temp directory, 127.0.0.1 only.

Used by the session fixture ``postgres_server`` in ``tests/conftest.py``. The server runs as the ``postgres``
user when the tests run as root (``initdb`` refuses root), on a free port, listening on 127.0.0.1 only (no
Unix socket), with password authentication (scram-sha-256; clients read the password from ``PGPASSWORD``)
and durability switched off (fsync, synchronous commit: a test server, fast). :meth:`PostgresServer.stop`
stops it (immediate mode) and deletes its directory; it is idempotent and also runs at interpreter exit.

Binaries are looked up on ``PATH`` and in Debian's ``/usr/lib/postgresql/<version>/bin`` (``apt-get install
postgresql`` puts them only there). When they, or the ``psycopg`` driver, are missing the tests skip with
:func:`unavailable`'s reason, unless ``MERGESEARCH_REQUIRE_POSTGRES=1`` (set by ``.ci/run``): then they fail.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

#: set to 1 (``.ci/run`` does) and a missing server or driver fails the PostgreSQL tests instead of skipping them
REQUIRE_ENV = "MERGESEARCH_REQUIRE_POSTGRES"
USER = "mergesearch"
_TOOLS = ("initdb", "pg_ctl", "postgres", "createdb")


def required() -> bool:
    """True when the PostgreSQL tests must run (``MERGESEARCH_REQUIRE_POSTGRES=1``)."""
    return os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0")


def _version(bindir: str) -> tuple[int, ...]:
    m = re.search(r"/postgresql/(\d+)(?:\.(\d+))?/", bindir + "/")
    return tuple(int(g) for g in m.groups() if g) if m else (0,)


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl, postgres and createdb (PATH first, then the newest Debian version)."""
    candidates = []
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).resolve().parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    for d in candidates:
        if all(os.access(os.path.join(d, t), os.X_OK) for t in _TOOLS):
            return Path(d)
    return None


def _run_as() -> str | None:
    """The user to run the server as: ``postgres`` when we are root, else None (ourselves)."""
    return "postgres" if os.geteuid() == 0 else None


def unavailable() -> str | None:
    """Why no PostgreSQL server can be started here, or None when one can."""
    if find_bindir() is None:
        return ("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin; "
                "install them with `apt-get install postgresql` (.ci/run does)")
    if _run_as():
        try:
            pwd.getpwnam(_run_as())
        except KeyError:
            return "running as root and there is no 'postgres' user to run the PostgreSQL server as"
    if importlib.util.find_spec("psycopg") is None:
        return 'the PostgreSQL driver psycopg is not installed (pip install "psycopg[binary]", in the dev extra)'
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL server in a temp directory; :meth:`start`, :meth:`create_database`, :meth:`url`, :meth:`stop`."""

    def __init__(self) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError(unavailable())
        self.bindir = bindir
        self.user = USER
        self.password = secrets.token_hex(12)
        self.port = 0
        self.root: Path | None = None
        self._started = False
        self._databases = 0

    # --- processes -------------------------------------------------------------------------------------------

    def _tool(self, name: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a server tool as the server's user; raise RuntimeError with its output when it fails."""
        res = subprocess.run([str(self.bindir / name), *args], capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL, user=_run_as(), cwd=self.root,
                             env={**os.environ, "LC_ALL": "C", "PGPASSWORD": self.password})
        if check and res.returncode != 0:
            out = (res.stderr or res.stdout)[-2000:]
            raise RuntimeError(f"{name} {' '.join(args)} failed ({res.returncode}): {out}")
        return res

    def _log(self) -> str:
        log = self.root / "server.log" if self.root else None
        return log.read_text(errors="replace")[-2000:] if log and log.exists() else ""

    def start(self, attempts: int = 3) -> PostgresServer:
        """initdb a cluster in a fresh temp directory and start it on a free port of 127.0.0.1."""
        # in /tmp itself (not pytest's 0700 root-only tmp tree), owned by the server's user
        self.root = Path(tempfile.mkdtemp(prefix="mergesearch-pg-"))
        atexit.register(self.stop)
        try:
            if _run_as():
                pw = pwd.getpwnam(_run_as())
                os.chown(self.root, pw.pw_uid, pw.pw_gid)
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n")
            pwfile.chmod(0o600)
            if _run_as():
                os.chown(pwfile, pw.pw_uid, pw.pw_gid)
            self._tool("initdb", "-D", "data", "-U", self.user, "--pwfile", str(pwfile), "--auth", "scram-sha-256",
                       "-E", "UTF8", "--locale", "C", "--no-sync")
            pwfile.unlink()
            with open(self.root / "data" / "postgresql.conf", "a") as f:
                f.write("\n# mergesearch tests: local only, no durability\n"
                        "listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                        "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                        "max_connections = 200\nshared_buffers = 32MB\n")
            for attempt in range(attempts):
                self.port = _free_port()  # another process may take it meanwhile: then retry on another one
                res = self._tool("pg_ctl", "-D", "data", "-l", "server.log", "-o", f"-p {self.port}",
                                 "-w", "-t", "60", "start", check=False, timeout=90)
                if res.returncode == 0:
                    self._started = True
                    return self
                if attempt == attempts - 1 or "could not bind" not in self._log():
                    raise RuntimeError(f"pg_ctl start failed ({res.returncode}): {res.stderr[-1000:]}\n{self._log()}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (immediate mode) and delete its directory; safe to call twice."""
        if self.root is None:
            return
        if self._started or (self.root / "data" / "postmaster.pid").exists():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self._tool("pg_ctl", "-D", "data", "-m", "immediate", "-w", "-t", "30", "stop", check=False,
                           timeout=60)
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    # --- clients ---------------------------------------------------------------------------------------------

    def url(self, database: str, driver: str = "") -> str:
        """``postgresql://user@127.0.0.1:PORT/database`` (``driver="psycopg"``: ``postgresql+psycopg://``).
        No password in it: clients read ``PGPASSWORD`` (set it to :attr:`password`)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (default: a fresh ``t<n>``); returns its name."""
        if not self._started:
            raise RuntimeError("the PostgreSQL server is not running")
        self._databases += 1
        name = name or f"t{self._databases}"
        self._tool("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return name
