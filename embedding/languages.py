"""Which language adapter encodes which text (X-MOD models such as ColBERT-XM).

An X-MOD encoder has one adapter per language in every layer (``config.languages``,
e.g. ``["en_XX", "de_DE", "zh_CN"]``). Corpus and query languages are usually ISO
codes (``de``, ``zh-TW``); :func:`resolve_adapter` maps them onto adapter names, and
:func:`route_languages` plans a whole batch: each text's adapter index (the model's
``lang_ids``), which texts fell back to the configured fallback adapter, and the
counts a job reports in its manifest.

Queries may come without a language: :func:`make_detector` builds the configured
detector. The built-in ``"script"`` detector only names languages whose script
identifies them (Greek, Thai, Devanagari, Hangul, kana, Han, Arabic, Hebrew,
Cyrillic -> ru, ...); a Latin-script text gets None and goes to the fallback.
Anything finer is a ``"module:function"`` taking a text and returning a code.
"""
from __future__ import annotations

import importlib
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

#: Scripts that name one language (the first letter of the script decides).
SCRIPT_LANGUAGES = (
    ("GREEK", "el"), ("THAI", "th"), ("DEVANAGARI", "hi"), ("HANGUL", "ko"), ("HIRAGANA", "ja"),
    ("KATAKANA", "ja"), ("CJK", "zh"), ("ARABIC", "ar"), ("HEBREW", "he"), ("CYRILLIC", "ru"),
    ("ARMENIAN", "hy"), ("GEORGIAN", "ka"), ("BENGALI", "bn"), ("TAMIL", "ta"), ("TELUGU", "te"),
    ("GUJARATI", "gu"), ("GURMUKHI", "pa"), ("KANNADA", "kn"), ("MALAYALAM", "ml"), ("SINHALA", "si"),
    ("KHMER", "km"), ("LAO", "lo"), ("MYANMAR", "my"), ("ETHIOPIC", "am"), ("TIBETAN", "bo"),
)
DETECTORS = ("none", "script")


class LanguageError(ValueError):
    """A text's language has no adapter and no fallback is configured (or a bad setting)."""


def normalise(lang: str) -> str:
    """``"zh-TW"`` -> ``"zh_tw"``: the form codes and adapter names are compared in."""
    return lang.strip().replace("-", "_").lower()


def resolve_adapter(lang: "str | None", languages: Sequence[str]) -> "str | None":
    """The adapter that encodes ``lang``, or None when there is none.

    Exact name first (``de_DE``), then case and ``-``/``_`` insensitive (``de-de``),
    then the ISO part (``de`` -> the first adapter named ``de_*`` in the model's order,
    so ``zh`` -> ``zh_CN`` when it is listed before ``zh_TW``).
    """
    if lang is None or not str(lang).strip():
        return None
    if lang in languages:
        return lang
    want = normalise(lang)
    by_norm = {normalise(a): a for a in reversed(languages)}  # first listed wins
    if want in by_norm:
        return by_norm[want]
    iso = want.split("_")[0]
    for adapter in languages:
        if normalise(adapter).split("_")[0] == iso:
            return adapter
    return None


@dataclass(frozen=True)
class Routing:
    """The adapter plan of one batch of texts.

    Attributes
    ----------
    lang_ids : (n,) int64, index into the model's adapters (its ``lang_ids`` input).
    fallback : (n,) bool, the text's language had no adapter and went to the fallback.
    adapters : the model's adapter names, in ``lang_ids`` order.
    unrouted : ``{language: texts}`` of the languages that fell back (None -> ``"und"``).
    """

    lang_ids: np.ndarray
    fallback: np.ndarray
    adapters: tuple[str, ...]
    unrouted: dict = field(default_factory=dict)

    def groups(self) -> list[tuple[int, np.ndarray]]:
        """``[(adapter index, positions)]`` in adapter order: the texts encoded together."""
        return [(int(a), np.flatnonzero(self.lang_ids == a)) for a in np.unique(self.lang_ids)]

    def counts(self) -> dict:
        """What a manifest records: texts per adapter, and how many fell back, by language."""
        per = Counter(self.adapters[i] for i in self.lang_ids.tolist())
        return {"per_adapter": dict(sorted(per.items())), "fallback": int(self.fallback.sum()),
                "fallback_languages": dict(sorted(self.unrouted.items()))}


def route_languages(langs: "Sequence[str | None]", adapters: Sequence[str], fallback: "str | None",
                    *, what: str = "texts") -> Routing:
    """Plan which adapter encodes each text.

    Parameters
    ----------
    langs : n language codes (None or empty: unknown).
    adapters : the model's adapter names (``config.languages``), in order.
    fallback : adapter (or code resolving to one) for languages without an adapter;
        None makes such a language an error.

    Raises
    ------
    LanguageError
        A language without an adapter and no fallback (the message lists the
        languages, how many texts each, and the adapters there are), or a fallback
        that is not an adapter.
    """
    adapters = tuple(adapters)
    index = {a: i for i, a in enumerate(adapters)}
    fb = check_fallback(fallback, adapters)
    cache: dict = {}
    ids = np.empty(len(langs), np.int64)
    fell = np.zeros(len(langs), bool)
    unrouted: Counter = Counter()
    for i, lang in enumerate(langs):
        if lang not in cache:
            cache[lang] = resolve_adapter(lang, adapters)
        adapter = cache[lang]
        if adapter is None:
            fell[i] = True
            unrouted[lang if lang else "und"] += 1
            adapter = fb
        ids[i] = index[adapter] if adapter is not None else -1
    if fb is None and unrouted:
        listed = ", ".join(f"{k!r} ({v})" for k, v in sorted(unrouted.items())[:10])
        raise LanguageError(f"{sum(unrouted.values())} {what} have a language with no adapter in the "
                            f"model: {listed}; the model's adapters are {list(adapters)}. Set a "
                            "fallback adapter (adapter_fallback) or map the languages")
    return Routing(ids, fell, adapters, dict(unrouted))


def check_fallback(fallback: "str | None", adapters: Sequence[str]) -> "str | None":
    """The adapter name ``fallback`` resolves to; LanguageError when it resolves to none."""
    if fallback is None:
        return None
    adapter = resolve_adapter(fallback, adapters)
    if adapter is None:
        raise LanguageError(f"fallback language {fallback!r} is not one of the model's adapters "
                            f"{list(adapters)}")
    return adapter


# ---- detection ----------------------------------------------------------------------
def script_language(text: str) -> "str | None":
    """The language named by the script of ``text``'s letters, or None (Latin, mixed, none).

    Counts letters per script; the majority script decides when it names one
    language. Kana anywhere makes Han text Japanese.
    """
    scripts: Counter = Counter()
    for ch in text:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        scripts[name.split(" ")[0]] += 1
    if not scripts:
        return None
    if scripts.get("HIRAGANA") or scripts.get("KATAKANA"):
        return "ja"
    top = scripts.most_common(1)[0][0]
    for script, lang in SCRIPT_LANGUAGES:
        if top.startswith(script):
            return lang
    return None


def make_detector(spec: "str | None") -> "Callable[[str], str | None] | None":
    """The query language detector named by ``spec``.

    ``None``/``"none"``: no detection (unknown languages go to the fallback);
    ``"script"``: :func:`script_language`; ``"package.module:function"``: that function
    (text -> language code or None), imported now so a bad name fails at once.
    """
    if spec is None or spec == "none":
        return None
    if spec == "script":
        return script_language
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise LanguageError(f"language detector {spec!r}: expected one of {DETECTORS} or 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise LanguageError(f"language detector {spec!r} could not be imported: {err}") from err
    if not callable(fn):
        raise LanguageError(f"language detector {spec!r} is not callable")
    return fn
