"""Storage errors a user can act on: the path being written, the URL that stopped answering."""
from __future__ import annotations

import errno
import logging
import os
import pickle

import pytest

from storage import fs
from storage.fs import Location, StorageUnavailable, is_transient, retry


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")   # as the kernel reports it: no file name


def test_disk_full_names_the_file_being_written(tmp_path, monkeypatch):
    target = Location(str(tmp_path / "v1" / "manifest.json"))
    monkeypatch.setattr(fs.os, "fsync", _disk_full)
    with pytest.raises(OSError) as err:
        target.write_bytes(b"{}")
    assert err.value.errno == errno.ENOSPC
    assert str(err.value) == f"[Errno 28] No space left on device: writing {target.url}"
    assert os.listdir(tmp_path / "v1") == []                 # no temporary file left behind


def test_disk_full_on_a_claim_leaves_no_empty_claim(tmp_path, monkeypatch):
    claim = Location(str(tmp_path / "v1" / "_claim.json"))

    class FullFile:
        def __init__(self, fd, mode):
            os.close(fd)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        write = staticmethod(_disk_full)

    monkeypatch.setattr(fs.os, "fdopen", FullFile)
    with pytest.raises(OSError, match=f"No space left on device: writing {claim.url}$"):
        claim.write_if_absent(b"{}")
    assert not claim.exists()                                # a later run can claim the version


def test_an_error_that_names_its_file_is_left_alone(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError) as err:                      # a folder where a file is
        Location(str(blocker / "sub" / "a.json")).write_bytes(b"{}")
    assert err.value.filename is not None and "writing" not in str(err.value)


def test_retry_gives_up_naming_the_url_and_the_last_error(monkeypatch):
    monkeypatch.setattr(fs.time, "sleep", lambda s: None)
    calls = []

    def unreachable():
        calls.append(1)
        raise ConnectionError('Could not connect to the endpoint URL: "http://127.0.0.1:9/b/k"')

    with pytest.raises(StorageUnavailable) as err:
        retry(unreachable, "write s3://b/k", attempts=3)
    assert len(calls) == 3
    assert str(err.value) == ('write s3://b/k: gave up after 3 attempts: ConnectionError: Could not connect '
                              'to the endpoint URL: "http://127.0.0.1:9/b/k"')
    assert not is_transient(err.value)                       # an outer retry does not start over
    back = pickle.loads(pickle.dumps(err.value))             # crosses from a Ray worker intact
    assert type(back) is StorageUnavailable and str(back) == str(err.value)


def test_retry_raises_other_errors_unchanged(monkeypatch):
    monkeypatch.setattr(fs.time, "sleep", lambda s: None)
    with pytest.raises(FileNotFoundError, match="gone"):
        retry(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), "read x")


def _unretrieved_task_failure(exc: BaseException) -> None:
    """Run a loop in which a task fails with ``exc`` that nothing awaits; asyncio reports it
    ("Task exception was never retrieved", with its traceback) when the task is collected."""
    import asyncio
    import gc

    async def fail():
        raise exc

    async def main():
        asyncio.get_running_loop().create_task(fail())
        await asyncio.sleep(0.01)

    asyncio.run(main())
    gc.collect()


def test_an_unawaited_connection_error_of_a_dead_endpoint_prints_no_traceback(caplog):
    """aiohttp's body writer fails with ClientConnectionResetError when the S3 endpoint goes away
    mid-request; the request's own failure is retried, the writer task's is noise (a CI run's
    stderr got its traceback). Other unretrieved task errors are still logged."""
    from aiohttp import ClientConnectionResetError

    from storage.fs import DroppedConnectionNoise, filesystem

    asyncio_logger = logging.getLogger("asyncio")
    for f in [f for f in asyncio_logger.filters if isinstance(f, DroppedConnectionNoise)]:
        asyncio_logger.removeFilter(f)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _unretrieved_task_failure(ClientConnectionResetError("Cannot write to closing transport"))
    assert any("never retrieved" in r.getMessage() for r in caplog.records)   # what happens without it
    caplog.clear()
    filesystem("s3")                                   # installs the filter, as every S3 user does
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _unretrieved_task_failure(ClientConnectionResetError("Cannot write to closing transport"))
        _unretrieved_task_failure(ConnectionResetError("reset by peer"))
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _unretrieved_task_failure(ValueError("a real bug"))
    assert any("never retrieved" in r.getMessage() for r in caplog.records)


class _Stop(Exception):
    pass


def _big_then_fail(f) -> None:
    """Write ~12 MiB (past s3fs's 5 MiB part: a multipart upload is under way), then fail."""
    for _ in range(12):
        f.write(os.urandom(1 << 20))
    raise _Stop("the writer failed half-way")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_with_publishes_the_whole_object_or_nothing(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    loc = Location(f"{root}/_sample/00000.parquet")
    data = os.urandom(7 << 20) + b"end"
    loc.write_with(lambda f: [f.write(data[i:i + (1 << 20)]) for i in range(0, len(data), 1 << 20)])
    assert loc.read_bytes() == data
    failed = Location(f"{root}/_sample/00001.parquet")
    with pytest.raises(_Stop):
        failed.write_with(_big_then_fail)
    assert not failed.exists()                          # not the 12 MiB written before the failure
    with pytest.raises(_Stop):
        loc.write_with(_big_then_fail)
    assert loc.read_bytes() == data                     # an object already there is left as it was
    if where == "local":
        assert sorted(os.listdir(tmp_path / "_sample")) == ["00000.parquet"]   # no temporary file


def test_write_stream_of_a_failing_producer_publishes_nothing_on_s3(s3_bucket):
    """fsspec completes a multipart upload when its file closes, error or not: a producer
    failing half-way must abort it instead of publishing the first parts."""
    def chunks():
        for _ in range(12):
            yield os.urandom(1 << 20)
        raise _Stop("the producer failed half-way")
    loc = Location(f"{s3_bucket}/v1/index.bin")
    with pytest.raises(_Stop):
        loc.write_stream(chunks)
    assert not loc.exists()
