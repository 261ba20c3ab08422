"""Plain helpers shared by test modules and ``conftest.py`` (no fixtures here).

Import them as ``from tests.helpers import ...``. ``conftest.py`` keeps the fixtures
and takes these from here, so no test module imports another module's private name.

    REPO_ROOT, TESTS_DIR        the checkout and its tests/ folder
    RAY_STATE                   the session's Ray bookkeeping (see ``conftest.ensure_local_ray``)
    mkdtemp_short()             a fresh directory short enough for Ray's unix sockets
    free_port()                 a free TCP port on 127.0.0.1
    clear_s3fs_instance_cache() forget fsspec's cached S3 filesystems (endpoints, listings)
    sample_docs(n), write_jsonl(url, rows)
                                a small multilingual corpus with metadata columns, and its JSONL file
"""
from __future__ import annotations

import json
import socket
import sys
import tempfile
import types
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

#: Unix socket paths are limited to ~107 bytes and Ray puts its sockets at
#: <temp_dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store.N (about 65
#: bytes after <temp_dir>), so Ray's temp dirs must stay short.
RAY_TEMP_DIR_MAX = 40

# pytest imports conftest.py as "tests.conftest" while test modules doing
# ``from conftest import start_two_node_cluster`` get a second copy named "conftest"
# (and this file may likewise be imported as "helpers" and "tests.helpers"); all must
# see the same Ray state, so it lives in one process-wide registry module.
_SHARED = sys.modules.get("_tessera_tests_shared")
if _SHARED is None:
    _SHARED = types.ModuleType("_tessera_tests_shared")
    _SHARED.ray_state = {
        "mode": None,  # "local" | "cluster" | None
        "local_address": None,  # GCS address of the session's local instance
        "root": None,  # short session dir, exported as RAY_TMPDIR
        "temp_dir": None,  # <root>/ray: the local instance's temp dir
        "owned_dirs": [],  # dirs created outside pytest's basetemp: removed at the end
    }
    sys.modules["_tessera_tests_shared"] = _SHARED
RAY_STATE: dict = _SHARED.ray_state


def mkdtemp_short() -> str:
    """A fresh short dir: under the session's Ray root if that stays short, else /tmp."""
    root = RAY_STATE["root"]
    if root is not None and len(root) + 10 <= RAY_TEMP_DIR_MAX:
        return tempfile.mkdtemp(prefix="r", dir=root)  # <root>/rXXXXXXXX
    d = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    RAY_STATE["owned_dirs"].append(d)
    return d


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clear_s3fs_instance_cache() -> None:
    """Forget cached S3 filesystems: fsspec caches instances (and their listings) per
    process, and a cached S3FileSystem may point at an old endpoint or hold stale listings."""
    try:
        import s3fs
    except ImportError:  # pragma: no cover
        return
    s3fs.S3FileSystem.clear_instance_cache()


SAMPLE_LANGS = ["en", "de", "fr", "es", "ru"]


def sample_docs(n: int, prefix: str = "d") -> list[dict]:
    """``n`` corpus rows (``id``, ``text``, ``lang``, ``title`` and two extra columns), texts
    cycling over the fixture model's multilingual sentences, each made unique by its number."""
    from fixtures_models import MULTILINGUAL_TEXTS

    texts = [t for group in MULTILINGUAL_TEXTS.values() for t in group] \
        if isinstance(MULTILINGUAL_TEXTS, dict) else list(MULTILINGUAL_TEXTS)
    return [{"id": f"{prefix}{i:04d}", "text": f"{texts[i % len(texts)]} ({i})",
             "lang": SAMPLE_LANGS[i % len(SAMPLE_LANGS)], "title": f"title {i}", "source": "unit-test",
             "year": 2000 + i % 7} for i in range(n)]


def write_jsonl(loc_url: str, rows: list[dict]) -> str:
    """Write ``rows`` as JSONL to a local path or s3:// URL; return the URL."""
    from storage.fs import location

    location(loc_url).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return loc_url


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``jobs.cli.main(argv)`` in this process (Ray shared with the session): exit code, stdout,
    stderr. The root logger's handlers and level, which the CLI sets up, are put back after."""
    import logging

    from jobs.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = main(list(argv))
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
