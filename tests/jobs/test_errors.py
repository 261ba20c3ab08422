"""From a worker's exception to the CLI's one line and exit code (jobs.errors), through real Ray."""
from __future__ import annotations

import errno
import pickle

import numpy as np
import pytest

from jobs.embed_worker import ShardError, ShardInputError, shard_error
from jobs.errors import describe, one_line, unwrap
from storage.corpus import CorpusError


def assert_one_clean_line(text: str) -> None:
    assert "\n" not in text and "\x1b[" not in text and "ray::" not in text and "Traceback" not in text, text


def _bad_scan(url: str):
    raise CorpusError(f"{url}: line 7: null or empty id")


def test_task_error_is_the_workers_own_exception(ray_local):
    ray = ray_local
    with pytest.raises(Exception) as caught:
        ray.get(ray.remote(max_retries=0)(_bad_scan).remote("/c/a.jsonl"))
    assert "ray::" in str(caught.value)                       # what the CLI used to print (17-35 lines)
    inner = unwrap(caught.value)
    assert type(inner) is CorpusError and str(inner) == "/c/a.jsonl: line 7: null or empty id"
    code, line = describe(caught.value)
    assert (code, line) == (2, "error: /c/a.jsonl: line 7: null or empty id")


class _FailingShard:
    def __init__(self, bad_input: bool) -> None:
        self.bad_input = bad_input

    def __call__(self, batch: dict) -> dict:
        shard = int(batch["shard"][0])
        try:
            if self.bad_input:
                raise CorpusError("/c/a.jsonl: rows 16-32: inconsistent column types: year")
            raise OSError(errno.ENOSPC,
                          "No space left on device: writing /store/sets/t/v000001/dense/part-00001.parquet")
        except Exception as err:
            raise shard_error(err, shard, "/c/a.jsonl", 16, 32) from err


@pytest.mark.parametrize("bad_input, code, text", [
    (True, 2, "error: /c/a.jsonl: rows 16-32: inconsistent column types: year (shard 1 (/c/a.jsonl, records 17-32))"),
    (False, 1, "failed: ShardError: shard 1 (/c/a.jsonl, records 17-32): OSError: [Errno 28] No space left on "
               "device: writing /store/sets/t/v000001/dense/part-00001.parquet"),
])
def test_ray_data_actor_error_keeps_its_class_and_message(ray_local, bad_input, code, text):
    """As jobs.embed runs its pools: Ray Data raises the actor's own exception, whose class says
    bad input (exit 2) or failure (exit 1) and whose message names shard, file and records."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.raise_original_map_exception
    ctx.raise_original_map_exception = True
    try:
        ds = ray.data.from_items([{"shard": 1}]).map_batches(
            _FailingShard, fn_constructor_kwargs={"bad_input": bad_input}, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1), num_cpus=0.5)
        with pytest.raises(Exception) as caught:
            ds.take_all()
    finally:
        ctx.raise_original_map_exception = saved
    assert isinstance(unwrap(caught.value), ShardInputError if bad_input else ShardError)
    got_code, line = describe(caught.value)
    assert (got_code, line) == (code, text)
    assert_one_clean_line(line)


class _Udf:
    def __call__(self, batch: dict) -> dict:
        raise ShardError("shard 4 (/c/b.jsonl, records 1-8): RuntimeError: boom")


def test_ray_data_wrapper_without_the_original_exception_still_gives_its_message(ray_local):
    """Ray Data's UserCodeException loses the UDF's exception on the way to the driver; the
    message is recovered from the traceback text."""
    import ray.data

    ds = ray.data.from_items([{"x": 1}]).map_batches(_Udf, batch_size=1, num_cpus=0.5,
                                                     compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1))
    with pytest.raises(Exception) as caught:
        ds.take_all()
    code, line = describe(caught.value)
    assert code == 1 and "shard 4 (/c/b.jsonl, records 1-8): RuntimeError: boom" in line, line
    assert "UDF failed" not in line
    assert_one_clean_line(line)


def _crash():
    import os

    os._exit(3)


def test_a_dead_worker_is_one_line(ray_local):
    ray = ray_local
    with pytest.raises(Exception) as caught:
        ray.get(ray.remote(max_retries=0)(_crash).remote())
    code, line = describe(caught.value)
    assert code == 1 and line.startswith("failed: Ray: The worker died unexpectedly"), line
    assert_one_clean_line(line)


def test_shard_errors_survive_pickling():
    err = shard_error(CorpusError("/c/a.jsonl: line 3: null or empty id"), 2, "/c/a.jsonl", 32, 48)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ShardInputError and isinstance(back, CorpusError) and isinstance(back, ShardError)
    assert str(back) == "/c/a.jsonl: line 3: null or empty id (shard 2 (/c/a.jsonl, records 33-48))"
    err = shard_error(ValueError("x" * 3), 0, "s3://b/c.parquet", 0, 10)
    assert str(pickle.loads(pickle.dumps(err))) == "shard 0 (s3://b/c.parquet, records 1-10): ValueError: xxx"
    assert shard_error(err, 5, "/other", 0, 1) is err             # never wrapped twice


def test_one_line():
    coloured = "\x1b[36mray::scan_file()\x1b[39m (pid=1)\n  File \"x.py\", line 3\nstorage.corpus.CorpusError: /a: bad"
    assert one_line("Traceback (most recent call last):\n" + coloured) == "storage.corpus.CorpusError: /a: bad"
    assert one_line(RuntimeError("shard 0 (/a, records 1-8): OSError: full\nFailed to apply UDF transform after "
                                 "1/1 attempts (total backoff 0.0s).\nTo change retry attempts, configure it")) \
        == "shard 0 (/a, records 1-8): OSError: full"
    assert one_line(ValueError("Binder Error: no column x\n\nLINE 1: select x")) == \
        "Binder Error: no column x LINE 1: select x"
    assert len(one_line("y" * 5000)) <= 600


def test_describe_exit_codes():
    from storage.lease import LeaseHeld
    from storage.manifest import NotFoundError

    full = OSError(errno.ENOSPC, "No space left on device: writing /s/sets/t/v000002/manifest.json")
    assert describe(full) == (1, "failed: OSError: [Errno 28] No space left on device: writing "
                                 "/s/sets/t/v000002/manifest.json")
    assert describe(NotFoundError("no published set 'x'")) == (2, "error: no published set 'x'")
    assert describe(LeaseHeld("lease s3://b/sets/t/_lease.json is held by pid 7"))[0] == 5
    try:
        try:
            int(np.float64("nan"))
        except ValueError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        code, line = describe(outer)
    assert code == 2 and "NaN" in line                       # the input error deep in the chain is what is said
