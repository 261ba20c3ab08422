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

import logging
from pathlib import Path

from storage import layout
from storage.corpus import ColumnMap, check_first_file, expand, text_bytes_per_row
from storage.fs import Location, location, retry
from storage.manifest import Artifact, NotFoundError

logger = logging.getLogger(__name__)


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


def content_tag(url: str) -> dict:
    """``{url, bytes, sha256 | etag}``: what an input file is, for a run's input and run keys.

    The sha256 of a local file's bytes; an s3 object's ETag (S3 changes it with every
    write, so no s3 object is read).
    """
    loc = Location(url)
    info = retry(lambda: loc.fs.info(loc.path), f"stat {url}")
    etag = str(info.get("ETag") or "").strip('"') if loc.is_remote else ""
    return {"url": url, "bytes": int(info["size"]), **({"etag": etag} if etag else {"sha256": loc.sha256()})}


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
    """``tessera embed``: faiss (the codec's k-means), the corpus and the model folder.
    Returns the corpus file URLs."""
    from embedding.faiss_import import import_faiss

    import_faiss()  # an install without the cpu/gpu extra: its one line, before anything is written
    urls = corpus(corpus_urls, cols)
    model_folder(model)
    return urls


def rows_per_shard(urls: list[str], cols: ColumnMap, given: "int | None" = None) -> int:
    """``tessera embed``'s rows per shard: ``given``, else (None) sized to the corpus's texts
    (:func:`jobs.plan.auto_rows_per_shard` of the mean text bytes of the first rows of the
    first files, :func:`storage.corpus.text_bytes_per_row`), logged. The job resolves it
    before the run is keyed, so its manifest and a later re-index record the number used."""
    if given is not None:
        return given
    from jobs.plan import auto_rows_per_shard  # numpy: only when there is a number to choose

    per_row = text_bytes_per_row(urls, cols)
    rows = auto_rows_per_shard(per_row)
    logger.info("rows per shard: %d (texts of ~%s UTF-8 bytes; --rows-per-shard sets it)", rows,
                "?" if per_row is None else f"{per_row:.0f}")
    return rows


def languages(urls: list[str], cols: ColumnMap, model: "str | Path", fallback: "str | None") -> None:
    """X-MOD models: the fallback adapter is one of theirs, and without one every corpus
    language has an adapter.

    Reads only the language column of each file (a Parquet column; a JSONL file's lines),
    a few files at a time, before Ray starts. A language without an adapter raises
    ``embedding.languages.LanguageError`` (exit 2) naming it, its documents and the first
    file that has it. Models without adapters, and runs with a fallback, read nothing.
    """
    from concurrent.futures import ThreadPoolExecutor

    from embedding.languages import LanguageError, resolve_adapter
    from embedding.model import EncoderSettings, check_adapter_settings

    # a fallback that is no adapter of the model, or a fallback for a model without adapters: ModelError
    adapters = check_adapter_settings(model_folder(model), EncoderSettings(adapter_fallback=fallback))
    if adapters is None or fallback is not None:
        return
    with ThreadPoolExecutor(max(1, min(8, len(urls)))) as pool:
        found = list(pool.map(lambda url: file_languages(url, cols), urls))
    missing: dict = {}
    for url, counts in zip(urls, found):
        for lang, n in counts.items():
            if resolve_adapter(lang, adapters) is None:
                first, total = missing.get(lang, (url, 0))
                missing[lang] = (first, total + n)
    if missing:
        listed = "; ".join(f"{lang or 'no language'!r}: {n} document(s), first in {url}"
                           for lang, (url, n) in sorted(missing.items(), key=lambda kv: str(kv[0]))[:10])
        raise LanguageError(f"the model's language adapters {list(adapters)} have none for {listed}. Set a "
                            "fallback adapter (--adapter-fallback LANG) or fix the documents' languages")


def file_languages(url: str, cols: ColumnMap) -> dict:
    """``{language or None: documents}`` of one corpus file (its language column only)."""
    from collections import Counter

    import pyarrow.parquet as pq

    from storage.corpus import CorpusError, file_format
    from storage.input_files import jsonl_objects

    loc = location(url)
    if file_format(url) == "parquet":
        with loc.open("rb") as f:
            pfile = pq.ParquetFile(f)
            if cols.lang not in pfile.schema_arrow.names:
                return {None: pfile.metadata.num_rows}
            values = pfile.read(columns=[cols.lang]).column(0).to_pylist()
    else:
        values = [obj.get(cols.lang) for _, obj in jsonl_objects(loc, CorpusError)]
    return dict(Counter(v if isinstance(v, str) and v.strip() else None for v in values))


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
