"""Cross-lingual query generation (xQG): a seq2seq model writes queries about a passage.

Any local Hugging Face encoder-decoder folder that ``AutoModelForSeq2SeqLM`` loads
(mT5, T5, BART, ...) works; it is prompted once per passage and target language with
:attr:`GenerationSettings.prompt` and returns ``queries_per_lang`` queries for each
(``num_return_sequences``). xQG's generator is an mT5 fine-tuned on prompts like the
default one. Prompts are generated ``max_batch`` at a time, longest first.

Sampling follows torch's global generator, seeded with ``seed`` before each batch:
the same passages, targets, settings and ``max_batch`` give the same queries.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from embedding.model import ModelError, check_model_dir, load_tokenizer

logger = logging.getLogger(__name__)

#: English names for ``{language}`` in prompts; other codes stand for themselves.
LANGUAGE_NAMES = {
    "ar": "Arabic", "bn": "Bengali", "de": "German", "el": "Greek", "en": "English", "es": "Spanish",
    "fa": "Persian", "fi": "Finnish", "fr": "French", "hi": "Hindi", "id": "Indonesian", "it": "Italian",
    "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian",
    "ru": "Russian", "sw": "Swahili", "te": "Telugu", "th": "Thai", "tr": "Turkish", "uk": "Ukrainian",
    "vi": "Vietnamese", "zh": "Chinese",
}


class GeneratorError(ModelError):
    """A generator folder that is not a usable seq2seq model, or bad generation settings."""


@dataclass(frozen=True)
class GenerationSettings:
    """How queries are generated.

    Attributes
    ----------
    queries_per_lang : queries per passage per target language (``num_return_sequences``).
    prompt : template with ``{text}`` (the passage), ``{language}`` (its English name,
        :data:`LANGUAGE_NAMES`) and ``{lang}`` (the code).
    max_input_length : prompt tokens kept (a longer prompt loses its end: put ``{text}`` last).
    max_new_tokens, min_new_tokens : generated query length in tokens.
    do_sample : top-k / nucleus sampling (xQG's setting); False: beam search with
        ``num_beams >= queries_per_lang`` (deterministic, fewer duplicates).
    top_k, top_p, temperature, num_beams : the usual ``generate`` settings.
    seed : seeds torch before each batch.
    max_batch : prompts per ``generate`` call.
    """

    queries_per_lang: int = 4
    prompt: str = "Generate a {language} question for this passage: {text}"
    max_input_length: int = 512
    max_new_tokens: int = 32
    min_new_tokens: int = 3
    do_sample: bool = True
    top_k: int = 10
    top_p: float = 1.0
    temperature: float = 1.0
    num_beams: int = 1
    seed: int = 0
    max_batch: int = 16

    def __post_init__(self) -> None:
        for name in ("queries_per_lang", "max_input_length", "max_new_tokens", "top_k", "num_beams", "max_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in 0..max_new_tokens ({self.max_new_tokens}), "
                             f"got {self.min_new_tokens}")
        if not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise ValueError(f"top_p must be in (0, 1] and temperature > 0, got {self.top_p}, {self.temperature}")
        if "{text}" not in self.prompt:
            raise ValueError(f"prompt must contain {{text}}, got {self.prompt!r}")
        try:
            self.prompt.format(text="", language="", lang="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"prompt {self.prompt!r}: only {{text}}, {{language}} and {{lang}} "
                             f"may be used ({err})") from err
        if not self.do_sample and self.num_beams < self.queries_per_lang:
            raise ValueError(f"beam search returns at most num_beams ({self.num_beams}) queries, "
                             f"fewer than queries_per_lang ({self.queries_per_lang})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class GeneratedQueries:
    """Queries generated for a batch of passages, in (passage, target, rank) order.

    Attributes
    ----------
    passage : (m,) int64, position of the query's passage in the input.
    texts : m query texts (stripped, never empty).
    langs : m target language codes.
    empty : generated sequences that decoded to nothing and were dropped.
    """

    passage: np.ndarray
    texts: list[str]
    langs: list[str]
    empty: int = 0

    def __len__(self) -> int:
        return len(self.texts)


def check_generator_dir(model_dir: "str | Path") -> Path:
    """Raise GeneratorError unless the folder is an encoder-decoder (seq2seq) model.

    Reads ``config.json`` only (no torch): a job checks this before any worker starts.
    """
    try:
        d = check_model_dir(model_dir)
    except ModelError as err:
        raise GeneratorError(f"query generator: {err}") from err
    try:
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GeneratorError(f"query generator folder {d}: config.json is not valid JSON: {err}") from err
    if not config.get("is_encoder_decoder"):
        kind = config.get("model_type", "unknown")
        archs = config.get("architectures") or []
        raise GeneratorError(f"query generator folder {d} is not a seq2seq model: its config.json has "
                             f"model_type {kind!r}{f' ({archs[0]})' if archs else ''} without "
                             "is_encoder_decoder; xQG needs an encoder-decoder such as mT5 or T5")
    return d


def prompts(texts: Sequence[str], targets: Sequence[str], template: str,
            passage_langs: "Sequence[str | None] | None" = None) -> tuple[list[str], np.ndarray, list[str]]:
    """The prompts of every (passage, target language) pair, skipping a passage's own language.

    Returns
    -------
    prompts : list of str; passage : (p,) int64 positions; langs : target of each prompt.
    """
    out, owner, langs = [], [], []
    for i, text in enumerate(texts):
        own = passage_langs[i] if passage_langs is not None else None
        for lang in targets:
            if own is not None and lang == own:
                continue
            out.append(template.format(text=text, language=LANGUAGE_NAMES.get(lang, lang), lang=lang))
            owner.append(i)
            langs.append(lang)
    return out, np.array(owner, np.int64), langs


class QueryGenerator:
    """A loaded seq2seq generator; :meth:`generate` turns passages into queries."""

    def __init__(self, path: Path, model, tokenizer, settings: GenerationSettings, device) -> None:
        self.path = path
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = device

    @classmethod
    def load(cls, model_dir: "str | Path", settings: "GenerationSettings | None" = None, *,
             device: "str | None" = None) -> "QueryGenerator":
        """Load a seq2seq folder offline (fp32 on CPU, fp16/bf16 on CUDA)."""
        import torch
        from transformers import AutoModelForSeq2SeqLM

        d = check_generator_dir(model_dir)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            tokenizer = load_tokenizer(d)
            model = AutoModelForSeq2SeqLM.from_pretrained(str(d), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise GeneratorError(f"query generator folder {d} could not be loaded as a seq2seq model: "
                                 f"{err}") from err
        if dev.type == "cuda":
            model.to(dev, dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        model.eval()
        logger.info("loaded query generator %s on %s", d, dev)
        return cls(d, model, tokenizer, settings or GenerationSettings(), dev)

    def generate(self, texts: Sequence[str], targets: Sequence[str], *,
                 passage_langs: "Sequence[str | None] | None" = None) -> GeneratedQueries:
        """``queries_per_lang`` queries per passage per target language.

        Parameters
        ----------
        texts : n passages.
        targets : language codes to generate in.
        passage_langs : each passage's language; its own is skipped (cross-lingual only).
        """
        s = self.settings
        all_prompts, owner, langs = prompts(texts, targets, s.prompt, passage_langs)
        n_ret = s.queries_per_lang
        outputs: list[list[str]] = [[] for _ in all_prompts]
        lengths = np.array([len(p) for p in all_prompts])
        order = np.argsort(-lengths, kind="stable")
        for start in range(0, len(order), s.max_batch):
            batch = order[start:start + s.max_batch]
            decoded = self._generate_batch([all_prompts[i] for i in batch])
            for row, i in enumerate(batch):
                outputs[i] = decoded[row * n_ret:(row + 1) * n_ret]
        passage, out_texts, out_langs, empty = [], [], [], 0
        for i, found in enumerate(outputs):
            for text in found:
                text = text.strip()
                if not text:
                    empty += 1
                    continue
                passage.append(owner[i])
                out_texts.append(text)
                out_langs.append(langs[i])
        if empty:
            logger.info("query generator: %d of %d generated queries were empty and dropped",
                        empty, len(all_prompts) * n_ret)
        return GeneratedQueries(np.array(passage, np.int64), out_texts, out_langs, empty)

    def _generate_batch(self, batch_prompts: list[str]) -> list[str]:
        import torch

        s = self.settings
        enc = self.tokenizer(batch_prompts, truncation=True, max_length=s.max_input_length, padding=True,
                             return_tensors="pt")
        torch.manual_seed(s.seed)
        options = dict(max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens,
                       num_return_sequences=s.queries_per_lang, do_sample=s.do_sample, num_beams=s.num_beams)
        if s.do_sample:
            options.update(top_k=s.top_k, top_p=s.top_p, temperature=s.temperature)
        with torch.inference_mode():
            out = self.model.generate(input_ids=enc["input_ids"].to(self.device),
                                      attention_mask=enc["attention_mask"].to(self.device), **options)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)
