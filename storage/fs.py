"""One URL-based file layer for local paths and ``s3://`` (through s3fs).

Every read and write in Tessera goes through :class:`Location` so the same code
runs against a laptop folder and an object store. Credentials and the endpoint
come from the standard AWS environment variables; they are handed to s3fs and
never logged or written anywhere.
"""
from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import random
import time
import uuid
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator, TypeVar

import fsspec

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors worth retrying: the S3 endpoint hiccuped, not the request was wrong.
_TRANSIENT_NAMES = ("ConnectionError", "EndpointConnectionError", "ReadTimeoutError",
                    "ConnectTimeoutError", "ServerDisconnectedError", "ClientOSError",
                    "ClientConnectorError", "ServiceUnavailable", "SlowDown",
                    "InternalError", "RequestTimeout", "TimeoutError")


def s3_options() -> dict:
    """s3fs options from the standard AWS environment variables.

    Only the endpoint is passed explicitly (s3fs and botocore read the key
    variables themselves); the returned dict must never be logged.
    """
    opts: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


class DroppedConnectionNoise(logging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" records of connection errors.

    When an S3 endpoint goes away mid-request, aiohttp's body-writer task fails with a
    connection error that nothing awaits any more (the request itself fails, and
    :func:`retry` handles that); asyncio then logs the task's traceback when it is
    collected. Only those records are dropped: any other asyncio record passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        unretrieved = "exception was never retrieved" in str(record.msg)
        return not (unretrieved and isinstance(exc, (OSError, *_aiohttp_errors())))


def _aiohttp_errors() -> tuple[type, ...]:
    try:
        from aiohttp import ClientError
    except ImportError:
        return ()
    return (ClientError,)


def quiet_dropped_connections() -> None:
    """Install :class:`DroppedConnectionNoise` on the ``asyncio`` logger (idempotent)."""
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, DroppedConnectionNoise) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(DroppedConnectionNoise())


def filesystem(protocol: str) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``"file"`` or ``"s3"``."""
    if protocol == "s3":
        import s3fs  # imported lazily: local-only users never pay for it

        quiet_dropped_connections()  # in every process that talks to S3: Ray workers too
        return s3fs.S3FileSystem(**s3_options())
    if protocol in ("file", "local", ""):
        return fsspec.filesystem("file")
    raise ValueError(f"unsupported URL scheme {protocol!r}: use a local path or s3://")


class StorageUnavailable(ConnectionError):
    """The store kept failing with transient errors until :func:`retry` gave up.

    The message names the operation and URL and the last error; it is not transient
    itself, so an outer retry does not start over.
    """


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` looks like a passing network or server fault."""
    if isinstance(err, StorageUnavailable):
        return False
    names = {type(e).__name__ for e in _chain(err)}
    text = str(err)
    return any(n in names or n in text for n in _TRANSIENT_NAMES) or \
        any(isinstance(e, (ConnectionError, TimeoutError)) for e in _chain(err))


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def retry(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Call ``fn`` retrying transient storage errors with exponential backoff and jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - filtered by is_transient
            if not is_transient(err):
                raise
            if attempt == attempts:
                raise StorageUnavailable(f"{what}: gave up after {attempts} attempts: "
                                         f"{type(err).__name__}: {err}") from err
            delay = base_delay * 2 ** (attempt - 1) * (1 + random.random())
            logger.warning("transient storage error on %s (attempt %d/%d), retrying in %.1fs: %s",
                           what, attempt, attempts, delay, type(err).__name__)
            time.sleep(delay)
    raise AssertionError("unreachable")


@dataclass(frozen=True, order=True)
class Location:
    """A URL in the store: ``/abs/path``, ``relative/path`` or ``s3://bucket/key``.

    Parameters
    ----------
    url : str
        Local paths are made absolute; ``s3://`` URLs keep their scheme.
    """

    url: str

    def __post_init__(self) -> None:
        if not self.url:
            raise ValueError("empty storage URL")
        if "://" in self.url:
            scheme = self.url.split("://", 1)[0]
            if scheme not in ("s3", "file"):
                raise ValueError(f"unsupported URL scheme {scheme!r} in {self.url!r}: "
                                 "use a local path or s3://")
            if scheme == "file":
                object.__setattr__(self, "url", os.path.abspath(self.url[len("file://"):]))
            else:
                object.__setattr__(self, "url", self.url.rstrip("/"))
        else:
            object.__setattr__(self, "url", os.path.abspath(os.path.expanduser(self.url)))

    # ---- naming -------------------------------------------------------------------
    @property
    def protocol(self) -> str:
        return "s3" if self.url.startswith("s3://") else "file"

    @property
    def is_remote(self) -> bool:
        return self.protocol == "s3"

    @property
    def path(self) -> str:
        """The path as the filesystem wants it (``bucket/key`` for s3)."""
        return self.url[len("s3://"):] if self.is_remote else self.url

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        # fsspec caches filesystem instances per arguments and process, so this is cheap.
        return filesystem(self.protocol)

    @property
    def name(self) -> str:
        return posixpath.basename(self.url.rstrip("/"))

    def join(self, *parts: str) -> "Location":
        """A child location; ``..`` segments are resolved (a later version's manifest
        names a reused file as ``../v000001/dense/part-00003.parquet``)."""
        joined = posixpath.join(self.url, *parts)
        if ".." not in joined.split("/"):
            return Location(joined)
        if self.is_remote:
            return Location("s3://" + posixpath.normpath(joined[len("s3://"):]))
        return Location(posixpath.normpath(joined))

    def relative_to(self, other: "Location") -> str:
        prefix = other.url.rstrip("/") + "/"
        if not self.url.startswith(prefix):
            raise ValueError(f"{self.url} is not under {other.url}")
        return self.url[len(prefix):]

    def __str__(self) -> str:
        return self.url

    # ---- reading ------------------------------------------------------------------
    def exists(self) -> bool:
        return retry(lambda: self.fs.exists(self.path), f"exists {self.url}")

    def read_bytes(self) -> bytes:
        return retry(lambda: self.fs.cat_file(self.path), f"read {self.url}")

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open(self, mode: str = "rb"):
        return self.fs.open(self.path, mode)

    def size(self) -> int:
        return int(retry(lambda: self.fs.size(self.path), f"size {self.url}"))

    def list(self) -> list["Location"]:
        """Direct children (files and folders); empty when the folder doesn't exist."""
        def _ls() -> list[str]:
            try:
                return self.fs.ls(self.path, detail=False, refresh=True) \
                    if self.is_remote else self.fs.ls(self.path, detail=False)
            except FileNotFoundError:
                return []
        return [self._child(p) for p in retry(_ls, f"list {self.url}")]

    def glob(self, pattern: str) -> list["Location"]:
        """Files matching ``pattern`` (relative to this location), sorted."""
        full = posixpath.join(self.path, pattern)
        if self.is_remote:
            self.fs.invalidate_cache()
        found = retry(lambda: self.fs.glob(full), f"glob {self.url}/{pattern}")
        return sorted(self._child(p) for p in found)

    def find(self) -> list["Location"]:
        """Every file under this folder, recursively, sorted; empty when it doesn't exist."""
        if self.is_remote:
            self.fs.invalidate_cache()

        def _find() -> list[str]:
            try:
                return self.fs.find(self.path)
            except FileNotFoundError:
                return []
        return sorted(self._child(p) for p in retry(_find, f"find {self.url}"))

    def _child(self, path: str) -> "Location":
        return Location(f"s3://{path}" if self.is_remote else path)

    def sha256(self) -> str:
        """Streaming sha256 of the object's bytes."""
        def _hash() -> str:
            digest = hashlib.sha256()
            with self.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            return digest.hexdigest()
        return retry(_hash, f"hash {self.url}")

    # ---- writing ------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        """Write the whole object atomically.

        s3: a single PUT is atomic. Local: write a temporary sibling, fsync, rename.
        """
        if self.is_remote:
            retry(lambda: self.fs.pipe_file(self.path, data), f"write {self.url}")
            return
        self._write_local(lambda f: f.write(data))

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_stream(self, chunks: Callable[[], Iterable[bytes]]) -> tuple[int, str]:
        """Write the bytes ``chunks()`` yields without holding them all; return (bytes, sha256).

        ``chunks`` is called again when a transient error restarts the write. s3: a
        multipart upload, visible only once complete. Local: a temporary sibling,
        fsync, rename. Either way a reader never sees a partial object.
        """
        def _write() -> tuple[int, str]:
            digest, size = hashlib.sha256(), [0]

            def fill(f: BinaryIO) -> None:
                for chunk in chunks():
                    digest.update(chunk)
                    size[0] += len(chunk)
                    f.write(chunk)
            if self.is_remote:
                self._write_remote(fill)
            else:
                self._write_local(fill)
            return size[0], digest.hexdigest()
        return retry(_write, f"write {self.url}")

    def write_with(self, fill: Callable[[BinaryIO], None]) -> None:
        """Write the object as ``fill(f)`` writes it to a binary file, atomically, without
        holding it whole (Parquet encoded straight to the store).

        s3: a multipart upload, completed only when ``fill`` returns (aborted when it
        raises) and retried from the start on a transient error. Local: a temporary
        sibling, fsync, rename. Either way a reader never sees a partial object.
        """
        if self.is_remote:
            retry(lambda: self._write_remote(fill), f"write {self.url}")
            return
        self._write_local(fill)

    def _write_remote(self, fill: Callable[[BinaryIO], None]) -> None:
        """s3: ``fill`` an upload that is completed only if it returns. fsspec's file
        completes a multipart upload on close whatever happened, so a failed ``fill``
        would publish what it wrote so far: the upload is aborted instead."""
        f = self.fs.open(self.path, "wb")
        try:
            fill(f)
        except BaseException:
            try:
                f.discard()  # s3fs: aborts the multipart upload; nothing was PUT yet otherwise
            finally:
                f.closed = True  # never completed, not even by the garbage collector
            raise
        f.close()

    def _write_local(self, fill: Callable[[BinaryIO], None]) -> None:
        """Write ``fill(f)`` to a temporary sibling, fsync, rename over this path. A failure
        leaves no partial file; an error that names no file (a full disk's ENOSPC) is
        raised naming this one."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as err:
            if err.filename is None:
                raise _naming(err, self.url) from err
            raise
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def write_if_absent(self, data: bytes) -> bool:
        """Create the object only if it does not exist; return whether we created it.

        s3 uses a conditional put (``If-None-Match: *``); local uses O_EXCL.
        """
        if self.is_remote:
            return retry(lambda: _s3_put_if_absent(self, data), f"create {self.url}")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as err:  # e.g. disk full: leave no empty claim behind
            os.remove(self.path)
            if err.filename is None:
                raise _naming(err, self.url) from err
            raise
        return True

    def makedirs(self) -> None:
        if not self.is_remote:
            os.makedirs(self.path, exist_ok=True)

    def delete(self, recursive: bool = False) -> None:
        def _rm() -> None:
            try:
                self.fs.rm(self.path, recursive=recursive)
            except FileNotFoundError:
                pass
        retry(_rm, f"delete {self.url}")


def _naming(err: OSError, url: str) -> OSError:
    """``err`` (which names no file: a full disk's ENOSPC) naming the file being written."""
    return OSError(err.errno, f"{err.strerror or err}: writing {url}")


def _s3_put_if_absent(loc: Location, data: bytes) -> bool:
    import botocore.exceptions

    fs = loc.fs
    bucket, key = loc.path.split("/", 1)

    async def _put():
        await fs.set_session()  # a fresh filesystem has no client until its first call
        client = await fs.get_s3()
        return await client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")

    try:
        fsspec.asyn.sync(fs.loop, _put)
    except botocore.exceptions.ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return False
        raise
    return True


def location(url: "str | Location") -> Location:
    """Coerce a string or Location to a Location."""
    return url if isinstance(url, Location) else Location(str(url))
