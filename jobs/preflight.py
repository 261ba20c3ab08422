"""Checks of a job's input that need neither Ray nor a model, run before either starts.

A missing corpus path used to fail after the model's fingerprint and Ray's start-up
(15-23 s); these checks answer in well under a second: paths exist (local and s3://),
their formats are supported, the first corpus file has the id and text columns, the
model folder has a config, the named set/index exists. They raise the jobs' usual
bad-input errors (``CorpusError``, ``ModelError``, ``NotFoundError``,
``FileNotFoundError``: exit 2 from the CLI). The CLI calls them before importing a job,
whose imports (torch) alone take seconds; embed and reindex also call :func:`embed` in
their ``run`` before the model's hash and Ray (reindex only there, after its run report
is started, so the ``runs`` view records a refused run).

Only light imports here (pyarrow, fsspec): no torch, no Ray.
"""
from __future__ import annotations

from pathlib import Path

from storage import layout
from storage.corpus import ColumnMap, check_first_file, expand
from storage.fs import Location, location, retry
from storage.manifest import Artifact, NotFoundError


def corpus(urls: "list[str] | tuple[str, ...]", cols: ColumnMap) -> list[str]:
    """The corpus files behind ``urls`` (files, globs, directories), the first one's
    columns checked. Returns their URLs, sorted."""
    files = expand(list(urls))
    check_first_file(files[0].url, cols)
    return [f.url for f in files]


def model_folder(path: "str | Path") -> Path:
    """A model folder with a config, weights and a tokenizer (ModelError otherwise)."""
    from embedding.model import check_model_dir  # no torch at import

    return check_model_dir(path)


def input_file(url: str, what: str) -> str:
    """A file that must exist (queries, qrels, training pairs); FileNotFoundError naming it."""
    loc = location(url)
    if not loc.exists() or loc.fs.isdir(loc.path):
        raise FileNotFoundError(f"{what} {loc.url}: no such file")
    return loc.url


def artifact(root: Location, kind: str, name: str, version: "str | None" = None) -> str:
    """The committed version of a set/index/encoder (the current one by default)."""
    return Artifact(root, kind, layout.check_name(name, f"{kind[:-1] if kind != 'indexes' else 'index'} name")) \
        .resolve(version)


def store(root: Location) -> Location:
    """A store root that exists: its folder, or its s3 bucket. A typo in ``--root`` is an
    error, not an empty listing."""
    if root.is_remote:
        bucket = root.path.split("/", 1)[0]
        if not _bucket_exists(root, bucket):
            raise NotFoundError(f"{root.url}: no such bucket {bucket!r} (check --root / $TESSERA_ROOT "
                                "and AWS_ENDPOINT_URL)")
    elif not root.exists():
        raise NotFoundError(f"no store at {root.url}: nothing was written there yet "
                            "(check --root / $TESSERA_ROOT)")
    return root


def _bucket_exists(root: Location, bucket: str) -> bool:
    import botocore.exceptions
    from fsspec.asyn import sync

    fs = root.fs

    async def head():
        await fs.set_session()
        client = await fs.get_s3()
        return await client.head_bucket(Bucket=bucket)

    try:
        retry(lambda: sync(fs.loop, head), f"check s3://{bucket}")
    except botocore.exceptions.ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            return False
        raise
    return True


# ---- per job ------------------------------------------------------------------------------
def embed(corpus_urls, model: "str | Path", cols: ColumnMap) -> list[str]:
    """``tessera embed``: the corpus and the model folder. Returns the corpus file URLs."""
    urls = corpus(corpus_urls, cols)
    model_folder(model)
    return urls


def evaluation(root: Location, indexes, queries: str, qrels: str) -> None:
    """``tessera eval``: the indexes exist, the queries and qrels files exist."""
    for name in indexes:
        artifact(root, "indexes", name)
    input_file(queries, "queries file")
    input_file(qrels, "qrels file")


def retune(root: Location, set_name: str, index: str, files: dict[str, "str | None"],
           index_version: "str | None" = None) -> None:
    """``tessera retune``: the set and index exist, every given input file exists."""
    artifact(root, "sets", set_name)
    artifact(root, "indexes", index, index_version)
    for what, url in files.items():
        if url:
            input_file(url, what)
