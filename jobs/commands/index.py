"""``tessera index``: an index built from a committed embedding set (``jobs.build_index``)."""
from __future__ import annotations

import argparse

from jobs.commands.common import INDEX_KINDS, Command, config_from, json_arg, print_json, root_arg
from jobs.errors import EXIT_OK


def add_arguments(i: argparse.ArgumentParser) -> None:
    i.add_argument("--set", dest="set_name", required=True)
    i.add_argument("--kind", required=True, choices=INDEX_KINDS)
    i.add_argument("--dim", type=int, help="Matryoshka prefix dimension (default: stored)")
    i.add_argument("--name", help="index name (default SET-KIND[-DIM])")
    i.add_argument("--set-version", help="default: the set's current version")
    i.add_argument("--nlist", type=int)
    i.add_argument("--pq-m", type=int)
    i.add_argument("--pq-nbits", type=int)
    i.add_argument("--hnsw-m", type=int)
    i.add_argument("--ef-construction", type=int)
    i.add_argument("--ef-search", type=int)
    i.add_argument("--nprobe", type=int)
    i.add_argument("--rescore", type=int, help="int8/binary/ivfpq: rescore k*RESCORE candidates")
    i.add_argument("--train-size", type=int)
    i.add_argument("--no-publish", dest="publish", action="store_false", default=None)
    # checked by the config (storage.layout.VECTORS), whose module would cost the parser an fsspec import
    i.add_argument("--vectors", metavar="plain|augmented",
                   help="the set's plain vectors (default) or its xQG-augmented ones (embed --augment-*)")
    root_arg(i)
    json_arg(i)


def to_config(args: argparse.Namespace):
    from jobs.build_index import IndexConfig

    return config_from(IndexConfig, args)


def run(args: argparse.Namespace) -> int:
    from jobs import preflight
    from storage.layout import check_name, resolve_root, vector_kind

    if args.vectors is not None:
        vector_kind("dense", args.vectors)  # before the set is looked up
    preflight.artifact(resolve_root(args.root), "sets", args.set_name, args.set_version)
    if args.name is not None:
        check_name(args.name, "index name")
    from jobs.build_index import run as build

    print_result(build(to_config(args)), args)
    return EXIT_OK


def print_result(manifest: dict, args: argparse.Namespace) -> None:
    if args.json:
        print_json(manifest)
        return
    print(f"index {manifest['name']} {manifest['version']}: {manifest['index_kind']} over "
          f"{manifest['n_docs']} documents of set {manifest['source']['set']} {manifest['source']['version']} "
          f"at dim {manifest['dim']}{' (augmented vectors)' if manifest.get('vectors') == 'augmented' else ''}, "
          f"{manifest['bytes_per_document']:.1f} bytes/document")


INDEX = Command("index", "build an index from a committed embedding set (no re-encoding)", add_arguments, run)
