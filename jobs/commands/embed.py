"""``tessera embed``: a corpus into a new version of an embedding set (``jobs.embed``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.commands.common import (
    MODES,
    POOLINGS,
    Command,
    config_from,
    constant,
    field_default,
    json_arg,
    or_list,
    print_json,
    root_arg,
    root_str,
    show_in_help,
)
from jobs.errors import EXIT_NOTHING, EXIT_OK, RUN_WORDS
from jobs.runtime import DEVICES

SAMPLE_CORPUS = Path(__file__).parent.parent / "data" / "sample_corpus.jsonl"
COLUMN_ROLES = ("id", "text", "lang", "title")


def add_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("--corpus", nargs="+", default=[str(SAMPLE_CORPUS)],
                   help="Parquet/JSONL files, globs or directories, local or s3:// (default: the bundled sample)")
    e.add_argument("--model", default="me5-small",
                   help="a local Hugging Face model folder, or a name fetched with `tessera model fetch`")
    e.add_argument("--set", dest="set_name", default="sample", help="embedding set name (default: sample)")
    root_arg(e)
    e.add_argument("--mode", choices=MODES)
    show_in_help(e.add_argument("--nbits", type=int,
                                help="ColBERT residual bits: %(allowed)s (default %(config_default)s: "
                                     "jobs.embed.DEFAULT_NBITS)"),
                 allowed=constant("embedding.codec", "SUPPORTED_NBITS", or_list),
                 config_default=field_default("jobs.embed", "EmbedConfig", "nbits"))
    for role in COLUMN_ROLES:
        e.add_argument(f"--{role}-column", help=f"corpus column holding the {role}")
    e.add_argument("--rows-per-shard", type=int)
    e.add_argument("--n-centroids", type=int, help="codec centroids (default 2^floor(log2(16*sqrt(tokens))))")
    e.add_argument("--kmeans-iters", type=int)
    e.add_argument("--max-sample-tokens", type=int, help="cap on codec training vectors")
    e.add_argument("--seed", type=int)
    e.add_argument("--batch-size", dest="max_batch", type=int, help="most texts per forward pass")
    e.add_argument("--max-batch-tokens", dest="max_tokens", type=int)
    e.add_argument("--actors", type=int, help="encoder actors (default: one per GPU, or sized to the CPUs)")
    e.add_argument("--threads", type=int, help="torch threads per CPU actor")
    e.add_argument("--device", choices=DEVICES)
    e.add_argument("--pooling", choices=POOLINGS)
    e.add_argument("--query-prefix")
    e.add_argument("--passage-prefix")
    e.add_argument("--max-length", type=int, help="dense token limit")
    e.add_argument("--doc-maxlen", type=int, help="ColBERT document token limit")
    e.add_argument("--query-maxlen", type=int, help="ColBERT query length")
    e.add_argument("--no-publish", dest="publish", action="store_false", default=None,
                   help="commit the version but leave CURRENT where it is")
    e.add_argument("--force", action="store_true", default=None,
                   help="embed even when the set's current version has the same corpus files, model and "
                        f"settings (otherwise: {RUN_WORDS[EXIT_NOTHING]}, exit {EXIT_NOTHING}, nothing written)")
    json_arg(e)


def columns(args: argparse.Namespace):
    """The corpus columns given (storage.corpus.ColumnMap; its defaults for the rest)."""
    from storage.corpus import ColumnMap

    given = {role: getattr(args, f"{role}_column") for role in COLUMN_ROLES}
    return ColumnMap(**{role: name for role, name in given.items() if name is not None})


def to_config(args: argparse.Namespace, model: Path):
    """The job's config: ``model`` is ``--model`` resolved to its folder."""
    from jobs.embed import EmbedConfig

    return config_from(EmbedConfig, args, corpus=tuple(args.corpus), model=str(model))


def run(args: argparse.Namespace) -> int:
    from jobs import preflight
    from jobs.model_fetch import resolve_model
    from storage.layout import check_name

    check_name(args.set_name, "set name")
    model = resolve_model(args.model)
    # Bad input fails here, in a second: before the job's imports (torch), Ray and the model.
    preflight.embed(args.corpus, model, columns(args))
    from jobs.embed import Unchanged
    from jobs.embed import run as embed

    try:
        manifest = embed(to_config(args, model))
    except Unchanged as same:
        print(f"tessera: {RUN_WORDS[EXIT_NOTHING]}: {same}", file=sys.stderr)
        return EXIT_NOTHING
    print_result(manifest, args)
    return EXIT_OK


def print_result(manifest: dict, args: argparse.Namespace) -> None:
    if args.json:
        print_json(manifest)
        return
    c = manifest["counts"]
    print(f"{manifest['name']} {manifest['version']}: {c['documents']} documents "
          f"({c['skipped_empty']} empty skipped, {c['truncated']} truncated), {c['shards']} shards, "
          f"{c['tokens']} ColBERT tokens, in {root_str(args)}/sets/{manifest['name']}/{manifest['version']}")


EMBED = Command("embed", "embed a corpus into a new version of an embedding set", add_arguments, run)
