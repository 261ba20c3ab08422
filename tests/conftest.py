"""Shared pytest fixtures for Tessera (see /work/shared/DESIGN.md, section Tests).

Everything runs offline on 2 CPU cores.

Model folders (session scope, built in a few seconds, treat them as read-only):
    tiny_model_dir            tiny random BERT (hidden 32, 2 layers) + cased WordPiece tokenizer
    tiny_colbert_dir          Stanford-ColBERT layout (bert.* keys + linear.weight, artifact.metadata)
    tiny_pylate_dir           PyLate layout (modules.json, 1_Dense/, "[Q] "/"[D] " tokens)
    tiny_model_no_weights_dir config + tokenizer, no weights (for error tests)
    me5_small_dir             the real multilingual-e5-small folder, or skip
    shared_data_dir           ../shared/data relative to the repo root, or skip
  The builders live in tests/fixtures_models.py (plain functions, usable from benchmarks).
  Plain helpers (free_port, mkdtemp_short, RAY_STATE, sample_docs, ...) live in
  tests/helpers.py: import them from there (``from tests.helpers import ...``).

S3:
    s3_server   (session)  moto ThreadedMotoServer on 127.0.0.1:<free port>; sets AWS_ENDPOINT_URL,
                           AWS_ACCESS_KEY_ID/SECRET=testing, AWS_DEFAULT_REGION=us-east-1 (restored at
                           the end); yields the endpoint URL "http://127.0.0.1:<port>".
    s3_bucket   (function) a fresh bucket "tessera-<8 hex>"; yields "s3://tessera-<8 hex>".

Ray:
    ray_session_tmp (session): short root dir for Ray (pytest's basetemp when short enough,
                else /tmp/rayXXXX), exported as RAY_TMPDIR; shuts Ray down and cleans up at
                the end.  Request it from any module/session fixture that starts Ray, then
                call ``ensure_local_ray()`` (what ray_local does).
    ray_local   (function scope on purpose, cheap): makes sure the driver is connected to the
                session's local Ray instance (num_cpus=2, no dashboard, temp dir
                <root>/ray, log_to_driver=False, Ray Data progress bars off) and starts it
                when needed.  Ray is started once per session and reused; it is only
                restarted (3-5 s) after a test connected the driver to something else (a
                two-node cluster from ``start_two_node_cluster``).  Yields ``ray``.
                ray_local depends on s3_server so that the AWS_* variables are already in the
                environment when Ray starts: Ray worker processes inherit the environment of
                the raylet, i.e. of the driver at ``ray.init`` time, so a moto server started
                later would be invisible to Ray tasks.
    start_two_node_cluster(tmp_dir) / stop_cluster(cluster): plain helpers (import them with
                ``from conftest import start_two_node_cluster, stop_cluster``), see their
                docstrings.  Request ``ray_session_tmp`` and ``s3_server`` (same reason as
                above) in fixtures/tests that use them.

Markers: ``gpu`` tests are skipped when torch sees no CUDA device; ``slow`` is informational.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

# Offline and quiet, before anything imports transformers / huggingface_hub / ray.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
# `pytest` (unlike `python -m pytest`) does not put the repo root on sys.path and the
# project is not installed into the venv; make `import embedding` etc. work either way,
# and make `import fixtures_models` work from any rootdir/import mode.
for _p in (str(REPO_ROOT), str(TESTS_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from fixtures_models import (  # noqa: E402
    build_tiny_colbert,
    build_tiny_model,
    build_tiny_model_no_weights,
    build_tiny_pylate,
)
from tests.helpers import (  # noqa: E402
    RAY_STATE,
    RAY_TEMP_DIR_MAX,
    clear_s3fs_instance_cache,
    free_port,
    mkdtemp_short,
)

# --------------------------------------------------------------------------- markers


#: The longest modules first: with pytest-xdist's ``--dist loadfile --no-loadscope-reorder``
#: (scripts/test.sh) each module runs on one worker in collection order, so starting the
#: long ones first keeps both workers busy to the end instead of one finishing a long
#: module alone (xdist's own reorder puts the modules with the most tests first, and
#: these have few, slow ones).
HEAVY_MODULES = ("jobs/test_reindex_faults.py", "jobs/test_cli.py", "jobs/test_reindex.py", "jobs/test_embed.py",
                 "jobs/test_cli_errors.py",
                 "jobs/test_retune.py", "jobs/test_build_index.py", "jobs/test_cluster.py",
                 "indexing/test_searcher.py", "test_fixtures.py", "storage/test_manifest_types.py")


def _module_rank(item) -> int:
    rel = Path(str(item.fspath)).resolve().relative_to(TESTS_DIR).as_posix()
    return HEAVY_MODULES.index(rel) if rel in HEAVY_MODULES else len(HEAVY_MODULES)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_module_rank)  # stable: the order inside a module is kept
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing / broken
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="gpu test: no CUDA device visible to torch")
        for item in gpu_items:
            item.add_marker(skip)


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Tiny random BERT folder (hidden 32, 2 layers, vocab 2000, model_max_length 512)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_colbert_dir(tmp_path_factory) -> Path:
    """Stanford-ColBERT style folder: dim 16, markers [unused0]/[unused1]."""
    return build_tiny_colbert(tmp_path_factory.mktemp("tiny-colbert"), dim=16)


@pytest.fixture(scope="session")
def tiny_pylate_dir(tmp_path_factory) -> Path:
    """PyLate style folder: 1_Dense 32->16, prefixes "[Q] " / "[D] "."""
    return build_tiny_pylate(tmp_path_factory.mktemp("tiny-pylate"), dim=16)


@pytest.fixture(scope="session")
def tiny_model_no_weights_dir(tmp_path_factory) -> Path:
    """config.json + tokenizer files, no model weights."""
    return build_tiny_model_no_weights(tmp_path_factory.mktemp("tiny-no-weights"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """../shared/data relative to the repo root (read-only shared data sets)."""
    path = (REPO_ROOT.parent / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip(f"../shared/data not found: expected the shared data folder at {path}")
    return path


ME5_DEFAULT_DIR = Path.home() / ".cache" / "tessera" / "models" / "me5-small"


@pytest.fixture(scope="session")
def me5_small_dir() -> Path:
    """The real multilingual-e5-small folder (built beforehand by the CI script).

    $TESSERA_ME5_DIR if set (it must then hold config.json and model.safetensors,
    otherwise the fixture errors: an explicit setting that is wrong should not turn
    into silent skips), else ~/.cache/tessera/models/me5-small if it holds
    model.safetensors, else skip.
    """
    env = os.environ.get("TESSERA_ME5_DIR")
    if env:
        path = Path(env).expanduser().resolve()
        missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
        if missing:
            pytest.fail(f"TESSERA_ME5_DIR={env} lacks {', '.join(missing)}", pytrace=False)
        return path
    if (ME5_DEFAULT_DIR / "model.safetensors").is_file():
        return ME5_DEFAULT_DIR
    pytest.skip(
        "multilingual-e5-small not available: set TESSERA_ME5_DIR or build it at "
        f"{ME5_DEFAULT_DIR} (needs model.safetensors)"
    )


# --------------------------------------------------------------------------- S3 (moto)


S3_TEST_KEY = "testing"
S3_TEST_SECRET = "testing"
S3_TEST_REGION = "us-east-1"

# Variables that would redirect or break the clients: hidden while the server runs.
_AWS_VARS_TO_HIDE = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


@pytest.fixture(scope="session")
def s3_server():
    """A real local S3 endpoint (moto) for the whole session; yields its URL."""
    import logging

    from moto.server import ThreadedMotoServer

    # moto's werkzeug server logs every request to stderr even with verbose=False.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    new_env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": S3_TEST_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_TEST_SECRET,
        "AWS_DEFAULT_REGION": S3_TEST_REGION,
        "AWS_REGION": S3_TEST_REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in (*new_env, *_AWS_VARS_TO_HIDE)}
    for k in _AWS_VARS_TO_HIDE:
        os.environ.pop(k, None)
    os.environ.update(new_env)
    clear_s3fs_instance_cache()
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        clear_s3fs_instance_cache()
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket; yields "s3://tessera-<8 hex>"."""
    import boto3

    name = f"tessera-{uuid.uuid4().hex[:8]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id=S3_TEST_KEY,
        aws_secret_access_key=S3_TEST_SECRET,
        region_name=S3_TEST_REGION,
    )
    client.create_bucket(Bucket=name)
    clear_s3fs_instance_cache()
    yield f"s3://{name}"
    clear_s3fs_instance_cache()


# --------------------------------------------------------------------------- Ray


def _short_ray_temp_dir(preferred: Path | str | None) -> str:
    """``preferred`` if short enough for Ray's sockets, else a fresh short dir."""
    if preferred is not None:
        p = Path(preferred).resolve()
        if len(str(p)) <= RAY_TEMP_DIR_MAX:
            p.mkdir(parents=True, exist_ok=True)
            return str(p)
    return mkdtemp_short()


def ray_temp_dir() -> str:
    """Temp dir of the session's local Ray instance (created on first use)."""
    if RAY_STATE["temp_dir"] is None:
        RAY_STATE["temp_dir"] = _short_ray_temp_dir(None)
    return RAY_STATE["temp_dir"]


def _ensure_default_ray_dir() -> None:
    # Cluster() writes <RAY_TMPDIR or /tmp>/ray/ray_current_cluster whatever temp_dir
    # its nodes get, and fails if that folder does not exist.
    from ray._common.utils import get_default_ray_temp_dir

    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)


def _quiet_ray_data() -> None:
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def _connected_to(address) -> bool:
    # Belt and braces on top of the mode flag: is the driver really on that instance?
    import ray

    try:
        return address is not None and ray.get_runtime_context().gcs_address == address
    except Exception:
        return False


def ensure_local_ray(num_cpus: int = 2):
    """Connect the driver to the session's local Ray instance, starting it if needed.

    Re-uses a running local instance; if the driver is connected to anything else
    (a cluster from ``start_two_node_cluster``), disconnects first.  Returns ``ray``.
    """
    import ray

    if ray.is_initialized() and RAY_STATE["mode"] == "local" and _connected_to(RAY_STATE["local_address"]):
        return ray
    shutdown_ray()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=ray_temp_dir(),
        log_to_driver=False,
        ignore_reinit_error=True,
    )
    RAY_STATE["mode"] = "local"
    RAY_STATE["local_address"] = ray.get_runtime_context().gcs_address
    _quiet_ray_data()
    return ray


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    RAY_STATE["mode"] = None
    RAY_STATE["local_address"] = None


def _rmtree_retry(path: str) -> None:
    import time

    for _ in range(5):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            return
        time.sleep(0.2)  # a Ray process may still be writing its last files


@pytest.fixture(scope="session")
def ray_session_tmp(tmp_path_factory):
    """Session-wide Ray housekeeping; request it from any fixture that starts Ray.

    Picks a short root dir (pytest's basetemp when short enough, else /tmp/rayXXXX),
    exports it as RAY_TMPDIR (so Ray's default /tmp/ray files, e.g. the cluster
    address file, land there too), shuts Ray down at the end and removes the dirs
    it created outside basetemp (set TESSERA_KEEP_RAY_TMP=1 to keep them).
    Yields the root.
    """
    basetemp = str(tmp_path_factory.getbasetemp().resolve())
    if len(basetemp) <= RAY_TEMP_DIR_MAX - 8:
        root = basetemp
    else:
        root = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        RAY_STATE["owned_dirs"].append(root)
    saved_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = root
    RAY_STATE["root"] = root
    RAY_STATE["temp_dir"] = _short_ray_temp_dir(Path(root) / "ray")
    try:
        yield Path(root)
    finally:
        shutdown_ray()
        if saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmpdir
        if not os.environ.get("TESSERA_KEEP_RAY_TMP"):
            for d in reversed(RAY_STATE["owned_dirs"]):
                _rmtree_retry(d)
            RAY_STATE["owned_dirs"].clear()
        RAY_STATE["root"] = RAY_STATE["temp_dir"] = None


@pytest.fixture
def ray_local(ray_session_tmp, s3_server):
    """Local Ray (num_cpus=2), started once per session; yields the ``ray`` module."""
    yield ensure_local_ray(num_cpus=2)


def start_two_node_cluster(tmp_dir):
    """Start a two-node ``ray.cluster_utils.Cluster`` and connect the driver to it.

    Head node (num_cpus=1) + one worker node (num_cpus=1), each with its own raylet
    and object store, on this machine (about 5-10 s on 2 cores).  Any existing Ray
    connection (e.g. the session's ``ray_local`` instance) is shut down first; the
    next ``ray_local`` use starts the local instance again.  ``tmp_dir`` becomes the
    nodes' Ray temp dir when it is short enough for Ray's unix sockets (<= 40
    chars; pytest's ``tmp_path`` usually is not), otherwise a short dir under the
    session's Ray root is used.

    The caller shuts it down with ``stop_cluster(cluster)`` (``ray.shutdown()`` +
    ``cluster.shutdown()``).  Fixtures using it should also request
    ``ray_session_tmp`` (keeps Ray's files in the session dir, final cleanup) and
    ``s3_server`` if Ray tasks must reach S3: the nodes inherit os.environ as it is
    at this call.
    """
    import ray
    from ray.cluster_utils import Cluster

    shutdown_ray()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    _ensure_default_ray_dir()
    temp_dir = _short_ray_temp_dir(tmp_dir)
    node_args = {"num_cpus": 1, "temp_dir": temp_dir}
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={**node_args, "include_dashboard": False},
        shutdown_at_exit=True,
    )
    try:
        cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
    except BaseException:
        shutdown_ray()
        cluster.shutdown()
        raise
    RAY_STATE["mode"] = "cluster"
    _quiet_ray_data()
    return cluster


def stop_cluster(cluster) -> None:
    """Disconnect the driver and stop every node of ``cluster``."""
    shutdown_ray()
    cluster.shutdown()
