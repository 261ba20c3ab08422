"""Parquet reads never hand Arrow's pre-buffering I/O threads a Python file object: a process
that did so (and imported torch) sometimes aborted at exit after its work was done
("terminate called without an active exception", apache/arrow#34314), a non-zero exit
that fails a nightly pipeline. Checked here on both of the store's read paths."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import input_files, schemas
from storage.fs import Location


class CorpusFileError(ValueError):
    pass


@pytest.fixture
def recorded_reads(monkeypatch):
    """``pq.read_table``'s and ``pq.ParquetFile``'s calls: (source, whether Arrow pre-buffers
    it: ``read_table``'s default is True, ``ParquetFile``'s False), the read still real."""
    calls = []
    real_read_table, real_parquet_file = pq.read_table, pq.ParquetFile

    def read_table(source, *args, **kwargs):
        calls.append((source, kwargs.get("pre_buffer", True)))
        return real_read_table(source, *args, **kwargs)

    def parquet_file(source, *args, **kwargs):
        calls.append((source, kwargs.get("pre_buffer", False)))
        return real_parquet_file(source, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", read_table)
    monkeypatch.setattr(pq, "ParquetFile", parquet_file)
    return calls


def _python_file(source) -> bool:
    """A file object Arrow reads by calling back into Python (an Arrow ``NativeFile`` is none)."""
    return hasattr(source, "read") and not isinstance(source, pa.NativeFile)


def _parquet(tmp_path) -> Location:
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["uno", "dos"]}), path)
    return Location(str(path))


def test_read_table_reads_the_store_s_file_without_pre_buffering(tmp_path, recorded_reads):
    table = schemas.read_table(_parquet(tmp_path), columns=["id"])
    assert table.column_names == ["id"] and table.column("id").to_pylist() == ["a", "b"]
    assert recorded_reads, "read_table no longer goes through pq.ParquetFile or pq.read_table: re-check this test"
    for source, pre_buffer in recorded_reads:
        assert not (_python_file(source) and pre_buffer), type(source)


def test_an_input_parquet_file_is_read_from_an_arrow_buffer(tmp_path, recorded_reads):
    table = input_files.read_parquet(_parquet(tmp_path), CorpusFileError)
    assert table.column("text").to_pylist() == ["uno", "dos"]
    assert recorded_reads
    for source, pre_buffer in recorded_reads:
        assert not (_python_file(source) and pre_buffer), type(source)
