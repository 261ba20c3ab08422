"""``tessera embed``: a corpus into a new version of an embedding set (``jobs.embed``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embedding.model import PRECISIONS
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

#: embedding.codec.KMEANS_CHOICES (not imported for --help: faiss loads with that module)
KMEANS = ("auto", "flat", "two-level", "flat-bf16", "progressive")

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
    e.add_argument("--kmeans", choices=KMEANS,
                   help="codec k-means: flat (PLAID's, float32), flat-bf16 (flat with bfloat16 assignment "
                        "products: 1.6-1.7x faster on CPUs with AVX-512 BF16 or AMX), two-level (~sqrt(k) coarse "
                        "cells, then each cell; several times faster, residuals slightly larger), progressive "
                        "(all but the last iteration on a quarter of the tokens; ~2x faster, residuals ~1%% larger) "
                        "or auto (the "
                        "default: flat-bf16 where the fitting CPU has native bfloat16 and the fit reaches "
                        "0.5 TFLOP, else flat)")
    e.add_argument("--max-sample-tokens", type=int, help="cap on codec training vectors")
    e.add_argument("--seed", type=int)
    e.add_argument("--batch-size", dest="max_batch", type=int, help="most texts per forward pass")
    e.add_argument("--max-batch-tokens", dest="max_tokens", type=int)
    e.add_argument("--actors", type=int, help="encoder actors (default: one per GPU, or sized to the CPUs)")
    e.add_argument("--threads", type=int, help="torch threads per CPU actor")
    e.add_argument("--calls-per-actor", type=int,
                   help="shards an encoder actor holds at once: with 2 one is read or written while the other "
                        "is encoded (default: 2 for an s3:// root, 1 for a local one)")
    e.add_argument("--device", choices=DEVICES)
    e.add_argument("--precision", choices=PRECISIONS,
                   help="the encoder's type: auto (the default) is bfloat16 on a GPU and on a CPU that "
                        "multiplies bfloat16 natively (AVX-512 BF16, AMX), float32 elsewhere")
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
    e.add_argument("--adapter-fallback", metavar="LANG",
                   help="X-MOD models: the adapter (name or language code) of documents whose language has "
                        "none, counted in the manifest (default: such a document is an error, exit 2)")
    add_augment_arguments(e)
    json_arg(e)


#: --augment-X / --gen-X options: the fields of jobs.embed_augment.AugmentConfig they set
AUGMENT_OPTIONS = {"augment_queries": "queries", "augment_column": "column", "augment_generator": "generator",
                   "augment_langs": "langs", "augment_per_lang": "per_lang", "augment_weight": "weight",
                   "augment_max_tokens": "max_tokens", "gen_seed": "seed", "gen_prompt": "prompt",
                   "gen_max_new_tokens": "max_new_tokens", "gen_min_new_tokens": "min_new_tokens",
                   "gen_do_sample": "do_sample", "gen_top_k": "top_k", "gen_top_p": "top_p",
                   "gen_temperature": "temperature", "gen_num_beams": "num_beams",
                   "gen_max_input_length": "max_input_length"}


def add_augment_arguments(e: argparse.ArgumentParser) -> None:
    """xQG passage augmentation (jobs.embed_augment): one source, the mix, the generation."""
    g = e.add_argument_group("passage augmentation (xQG): augmented vectors stored next to the plain ones")
    g.add_argument("--augment-queries", metavar="FILE",
                   help="Parquet/JSONL queries about passages: passage_id, text, lang (local or s3://)")
    g.add_argument("--augment-column", metavar="COLUMN",
                   help="corpus column with each document's queries (strings or {text, lang} objects)")
    g.add_argument("--augment-generator", metavar="DIR", help="a seq2seq model folder that writes the queries")
    g.add_argument("--augment-langs", metavar="LANGS",
                   help="comma-separated target languages (the generator's; filters a file's or column's)")
    g.add_argument("--augment-per-lang", type=int, metavar="N", help="queries per passage per language")
    show_in_help(g.add_argument("--augment-weight", type=float, metavar="W",
                                help="the passage's weight in the dense mean (default %(config_default)s)"),
                 config_default=field_default("jobs.embed_augment", "AugmentConfig", "weight"))
    show_in_help(g.add_argument("--augment-max-tokens", type=int, metavar="N",
                                help="most query tokens appended to a passage's ColBERT tokens "
                                     "(default %(config_default)s)"),
                 config_default=field_default("jobs.embed_augment", "AugmentConfig", "max_tokens"))
    g.add_argument("--gen-seed", type=int, help="the generator's seed (default --seed)")
    g.add_argument("--gen-prompt", help="prompt template with {text}, {language} and {lang}")
    for name in ("max-new-tokens", "min-new-tokens", "top-k", "num-beams", "max-input-length"):
        g.add_argument(f"--gen-{name}", type=int)
    g.add_argument("--gen-top-p", type=float)
    g.add_argument("--gen-temperature", type=float)
    g.add_argument("--gen-do-sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample (top-k/nucleus) or, with --no-gen-do-sample, beam search")


def augment_config(args: argparse.Namespace):
    """jobs.embed_augment.AugmentConfig from the options given; None when none was."""
    values = {field: getattr(args, dest) for dest, field in AUGMENT_OPTIONS.items()
              if getattr(args, dest, None) is not None}
    if not values:
        return None
    from jobs.embed_augment import AugmentConfig

    return AugmentConfig(**values)


def columns(args: argparse.Namespace):
    """The corpus columns given (storage.corpus.ColumnMap; its defaults for the rest)."""
    from storage.corpus import ColumnMap

    given = {role: getattr(args, f"{role}_column") for role in COLUMN_ROLES}
    return ColumnMap(**{role: name for role, name in given.items() if name is not None})


def to_config(args: argparse.Namespace, model: Path):
    """The job's config: ``model`` is ``--model`` resolved to its folder."""
    from jobs.embed import EmbedConfig

    return config_from(EmbedConfig, args, corpus=tuple(args.corpus), model=str(model), augment=augment_config(args))


def run(args: argparse.Namespace) -> int:
    from jobs import preflight
    from jobs.model_fetch import resolve_model
    from storage.layout import check_name

    check_name(args.set_name, "set name")
    model = resolve_model(args.model)
    # Bad input fails here, in a second: before the job's imports (torch), Ray and the model.
    preflight.embed(args.corpus, model, columns(args))
    augment_config(args)  # bad augmentation settings too
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
    w = manifest.get("workers") or {}
    if w.get("precision"):
        print(f"encoded in {w['precision']} on {w.get('device')}")
    if "adapter_fallback" in c:
        print(f"language adapters: {c['per_adapter']}; {c['adapter_fallback']} documents without an adapter "
              f"went to the fallback {c['adapter_fallback_languages']}")
    if "augment" in manifest:  # (a column name no document has gives no queries: see the count)
        a = manifest["augment"]["counts"]
        print(f"augmented ({manifest['augment']['source']}): {a['queries']} queries on {a['passages']} passages, "
              f"{a['tokens']} query tokens appended")


EMBED = Command("embed", "embed a corpus into a new version of an embedding set", add_arguments, run)
