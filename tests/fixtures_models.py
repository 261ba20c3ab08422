"""Tiny, fully offline model folders for tests and benchmarks.

Everything here is built locally in well under a second per folder (after the
torch/transformers imports): a cased WordPiece tokenizer (a `tokenizers`
WordPiece model with BERT's normalizer and pre-tokenizer) whose ~2000-entry
vocabulary is learned from the small multilingual text list below, and a
randomly initialised 2-layer BERT (``torch.manual_seed(0)``).  Nothing is
downloaded, and every build is byte-for-byte identical (the vocabulary is counted
deterministically here: ``tokenizers.trainers.WordPieceTrainer`` gives a slightly
different vocabulary on every run, see ``train_wordpiece_vocab``).

Public functions (plain functions so that benchmarks can call them too):

- ``build_tiny_model(out_dir, *, colbert_dim=None, markers=False, hidden=32)``
  plain BERT folder; with ``colbert_dim`` a Stanford-ColBERT style folder.
- ``build_tiny_colbert(out_dir, *, dim=16, hidden=32)``  Stanford ColBERT style.
- ``build_tiny_pylate(out_dir, *, dim=16, hidden=32)``   PyLate style.
- ``build_tiny_model_no_weights(out_dir, *, hidden=32)`` config + tokenizer only.
- ``build_tiny_xmod(out_dir, *, languages=("en_XX", "de_DE"), colbert_dim=None, hidden=32)``
  X-MOD encoder with one adapter per language (ColBERT-XM style with ``colbert_dim``).
- ``build_tiny_seq2seq(out_dir, *, hidden=32)``          T5 query generator.
- ``build_tokenizer(*, extra_special_tokens=())``        the tokenizer alone.
- ``MULTILINGUAL_TEXTS`` / ``ALL_TEXTS``                 sample sentences (9 languages).

Folder layouts
--------------
Plain (``build_tiny_model``)::

    config.json  model.safetensors  tokenizer.json  tokenizer_config.json
    vocab.txt (written here: transformers 5 save_pretrained only writes tokenizer.json)

Stanford ColBERT (``build_tiny_colbert``), as written by ColBERT's
``HF_ColBERT(BertPreTrainedModel)``: config.json has
``"architectures": ["HF_ColBERT"]``; ``model.safetensors`` holds the BERT
weights under the ``bert.`` prefix (``bert.embeddings.word_embeddings.weight``
...) plus ``linear.weight`` of shape (dim, hidden), no bias.  ``AutoModel``
(a ``BertModel``, base_model_prefix ``"bert"``) strips the ``bert.`` prefix and
loads every BERT weight; ``linear.weight`` is reported as an *unexpected* key
(harmless; it is not part of BertModel).  ``[unused0]`` / ``[unused1]`` are in
the vocabulary (ids 5 and 6, right after the five BERT special tokens) and
``artifact.metadata`` is JSON with query/doc marker tokens, dim and max lengths.

PyLate (``build_tiny_pylate``), as written by ``pylate.models.ColBERT.save``:
the plain BERT folder at the root (module 0, a sentence-transformers
``Transformer`` with path ""), ``modules.json``, ``1_Dense/config.json`` and
``1_Dense/model.safetensors`` (key ``linear.weight``, shape (dim, hidden)),
``config_sentence_transformers.json`` with ``query_prefix`` "[Q] " and
``document_prefix`` "[D] " (PyLate's defaults; note the trailing space) and
both prefixes added to the tokenizer with ``tokenizer.add_tokens`` (normal,
non-special added tokens, exactly as PyLate does), so the vocabulary -- and the
word-embedding matrix -- is two rows longer than the plain model's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
COLBERT_MARKERS = ["[unused0]", "[unused1]"]
PYLATE_QUERY_PREFIX = "[Q] "
PYLATE_DOCUMENT_PREFIX = "[D] "
VOCAB_SIZE = 2000
MODEL_MAX_LENGTH = 512

# A small multilingual corpus: the tokenizer is trained on it, and tests may use
# it as sample input (every language here tokenizes to real word pieces).
MULTILINGUAL_TEXTS: dict[str, list[str]] = {
    "en": [
        "The quick brown fox jumps over the lazy dog.",
        "Where is the nearest train station, please?",
        "Distributed systems need careful handling of partial failures.",
        "She bought three apples, two pears and a loaf of bread.",
        "The library opens at nine o'clock on Monday morning.",
        "Vector search finds the nearest neighbours of a query embedding.",
        "It rained all night, so the river rose above the old bridge.",
        "My grandmother writes letters to her friends every week.",
        "How many languages can a single model understand?",
        "The museum keeps paintings from the seventeenth century.",
        "Please compress the index before uploading it to storage.",
        "Children were playing football in the park after school.",
    ],
    "de": [
        "Der schnelle braune Fuchs springt über den faulen Hund.",
        "Wo ist der nächste Bahnhof, bitte?",
        "Verteilte Systeme müssen Teilausfälle sorgfältig behandeln.",
        "Sie kaufte drei Äpfel, zwei Birnen und ein Brot.",
        "Die Bibliothek öffnet am Montagmorgen um neun Uhr.",
        "Die Vektorsuche findet die nächsten Nachbarn einer Anfrage.",
        "Es regnete die ganze Nacht, und der Fluss stieg über die Brücke.",
        "Meine Großmutter schreibt jede Woche Briefe an ihre Freundinnen.",
        "Wie viele Sprachen kann ein einziges Modell verstehen?",
        "Das Museum bewahrt Gemälde aus dem siebzehnten Jahrhundert.",
        "Bitte komprimiere den Index, bevor du ihn hochlädst.",
        "Nach der Schule spielten die Kinder im Park Fußball.",
    ],
    "fr": [
        "Le renard brun rapide saute par-dessus le chien paresseux.",
        "Où se trouve la gare la plus proche, s'il vous plaît ?",
        "Les systèmes distribués doivent gérer les pannes partielles.",
        "Elle a acheté trois pommes, deux poires et une baguette.",
        "La bibliothèque ouvre à neuf heures le lundi matin.",
        "La recherche vectorielle trouve les voisins les plus proches.",
        "Il a plu toute la nuit et la rivière a débordé sous le pont.",
        "Ma grand-mère écrit des lettres à ses amies chaque semaine.",
        "Combien de langues un seul modèle peut-il comprendre ?",
        "Le musée conserve des tableaux du dix-septième siècle.",
        "Veuillez compresser l'index avant de le téléverser.",
        "Les enfants jouaient au football dans le parc après l'école.",
    ],
    "es": [
        "El rápido zorro marrón salta sobre el perro perezoso.",
        "¿Dónde está la estación de tren más cercana, por favor?",
        "Los sistemas distribuidos deben manejar fallos parciales.",
        "Compró tres manzanas, dos peras y una barra de pan.",
        "La biblioteca abre a las nueve el lunes por la mañana.",
        "La búsqueda vectorial encuentra los vecinos más cercanos.",
        "Llovió toda la noche y el río subió por encima del puente.",
        "Mi abuela escribe cartas a sus amigas cada semana.",
        "¿Cuántos idiomas puede entender un solo modelo?",
        "El museo guarda pinturas del siglo diecisiete.",
        "Por favor, comprime el índice antes de subirlo.",
        "Los niños jugaban al fútbol en el parque después de clase.",
    ],
    "ru": [
        "Быстрая коричневая лиса прыгает через ленивую собаку.",
        "Где находится ближайший вокзал, пожалуйста?",
        "Распределённые системы должны обрабатывать частичные сбои.",
        "Она купила три яблока, две груши и буханку хлеба.",
        "Библиотека открывается в девять часов утра в понедельник.",
        "Векторный поиск находит ближайших соседей запроса.",
        "Всю ночь шёл дождь, и река поднялась выше старого моста.",
        "Моя бабушка каждую неделю пишет письма своим подругам.",
        "Сколько языков может понимать одна модель?",
        "В музее хранятся картины семнадцатого века.",
        "Пожалуйста, сожми индекс перед загрузкой.",
        "После школы дети играли в футбол в парке.",
    ],
    "el": [
        "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
        "Πού είναι ο πλησιέστερος σιδηροδρομικός σταθμός;",
        "Τα κατανεμημένα συστήματα πρέπει να χειρίζονται μερικές αστοχίες.",
        "Αγόρασε τρία μήλα, δύο αχλάδια και ένα ψωμί.",
        "Η βιβλιοθήκη ανοίγει στις εννέα τη Δευτέρα το πρωί.",
        "Η διανυσματική αναζήτηση βρίσκει τους πλησιέστερους γείτονες.",
        "Έβρεχε όλη τη νύχτα και το ποτάμι ανέβηκε πάνω από τη γέφυρα.",
        "Η γιαγιά μου γράφει γράμματα στις φίλες της κάθε εβδομάδα.",
        "Πόσες γλώσσες μπορεί να καταλάβει ένα μόνο μοντέλο;",
        "Το μουσείο φυλάσσει πίνακες του δέκατου έβδομου αιώνα.",
        "Παρακαλώ συμπίεσε το ευρετήριο πριν το ανεβάσεις.",
        "Τα παιδιά έπαιζαν ποδόσφαιρο στο πάρκο μετά το σχολείο.",
    ],
    "ar": [
        "الثعلب البني السريع يقفز فوق الكلب الكسول.",
        "أين أقرب محطة قطار من فضلك؟",
        "يجب على الأنظمة الموزعة معالجة الأعطال الجزئية بعناية.",
        "اشترت ثلاث تفاحات وحبتين من الكمثرى ورغيف خبز.",
        "تفتح المكتبة في الساعة التاسعة صباح يوم الاثنين.",
        "البحث المتجهي يجد أقرب الجيران للاستعلام.",
        "أمطرت طوال الليل وارتفع النهر فوق الجسر القديم.",
        "جدتي تكتب رسائل إلى صديقاتها كل أسبوع.",
        "كم عدد اللغات التي يمكن لنموذج واحد أن يفهمها؟",
        "يحتفظ المتحف بلوحات من القرن السابع عشر.",
        "من فضلك اضغط الفهرس قبل رفعه.",
        "كان الأطفال يلعبون كرة القدم في الحديقة بعد المدرسة.",
    ],
    "zh": [
        "敏捷的棕色狐狸跳过了懒惰的狗。",
        "请问最近的火车站在哪里？",
        "分布式系统需要仔细处理部分故障。",
        "她买了三个苹果、两个梨和一个面包。",
        "图书馆星期一早上九点开门。",
        "向量搜索可以找到查询的最近邻居。",
        "下了一整夜的雨，河水漫过了旧桥。",
        "我的奶奶每个星期都给朋友写信。",
        "一个模型能理解多少种语言？",
        "这个博物馆收藏着十七世纪的画作。",
        "上传之前请先压缩索引。",
        "放学后孩子们在公园里踢足球。",
    ],
    "hi": [
        "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।",
        "कृपया बताइए, सबसे नज़दीकी रेलवे स्टेशन कहाँ है?",
        "वितरित प्रणालियों को आंशिक विफलताओं को सावधानी से संभालना चाहिए।",
        "उसने तीन सेब, दो नाशपाती और एक रोटी खरीदी।",
        "पुस्तकालय सोमवार सुबह नौ बजे खुलता है।",
        "वेक्टर खोज किसी प्रश्न के सबसे नज़दीकी पड़ोसी ढूँढती है।",
        "पूरी रात बारिश हुई और नदी पुराने पुल के ऊपर तक चढ़ गई।",
        "मेरी दादी हर हफ़्ते अपनी सहेलियों को चिट्ठियाँ लिखती हैं।",
        "एक ही मॉडल कितनी भाषाएँ समझ सकता है?",
        "संग्रहालय में सत्रहवीं शताब्दी के चित्र रखे हैं।",
        "कृपया अपलोड करने से पहले इंडेक्स को संकुचित करें।",
        "स्कूल के बाद बच्चे पार्क में फ़ुटबॉल खेल रहे थे।",
    ],
}

ALL_TEXTS: list[str] = [t for texts in MULTILINGUAL_TEXTS.values() for t in texts]


# Every letter of these scripts gets a vocabulary entry (and a "##" continuation
# entry), so words in these scripts never collapse to [UNK] even if unseen.
_ALPHABET_RANGES = [
    (0x21, 0x7E),      # ASCII printable (letters, digits, punctuation)
    (0xC0, 0xFF),      # Latin-1 letters (À..ÿ)
    (0x391, 0x3CE),    # Greek
    (0x386, 0x38F),    # Greek with tonos
    (0x401, 0x451),    # Cyrillic (Ё, А..я, ё)
    (0x621, 0x64A),    # Arabic letters
    (0x900, 0x97F),    # Devanagari
]


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _pretokenize(texts: Iterable[str]) -> list[str]:
    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
    )
    pre = pre_tokenizers.BertPreTokenizer()
    return [w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))]


def train_wordpiece_vocab(
    texts: Iterable[str] = ALL_TEXTS,
    *,
    vocab_size: int = VOCAB_SIZE,
    specials: Sequence[str] = SPECIAL_TOKENS,
) -> dict[str, int]:
    """Deterministic WordPiece vocabulary "training" on ``texts``.

    tokenizers' ``WordPieceTrainer`` is not reproducible (tie-breaking follows Rust
    HashMap order, so two runs give vocabularies differing in ~10% of entries), and
    tests want the same token ids in every run.  So the vocabulary is counted here,
    with the same normalizer / pre-tokenizer as the final tokenizer: special tokens,
    then every character of the corpus and of the alphabets above (plus its "##"
    continuation, except for CJK and punctuation, which BERT always splits off),
    then whole words, prefixes and "##" word pieces by frequency (ties by length and
    text) until ``vocab_size``.
    """
    import unicodedata
    from collections import Counter

    words = Counter(_pretokenize(texts))
    chars = {chr(cp) for lo, hi in _ALPHABET_RANGES for cp in range(lo, hi + 1)}
    chars |= {ch for w in words for ch in w}
    chars = {ch for ch in chars if unicodedata.category(ch)[0] in "LMNPS" and not ch.isspace()}

    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        if tok not in vocab and len(vocab) < vocab_size:
            vocab[tok] = len(vocab)

    for tok in specials:
        add(tok)
    for ch in sorted(chars):
        add(ch)
    for ch in sorted(chars):
        if unicodedata.category(ch)[0] in "LMN" and not _is_cjk(ch):
            add("##" + ch)

    pieces: Counter = Counter()
    for w, c in words.items():
        if len(w) < 2:
            continue
        pieces[w] += 2 * c
        for n in range(2, min(6, len(w))):
            pieces[w[:n]] += c
        for i in range(1, len(w)):
            for n in range(2, min(5, len(w) - i + 1)):
                pieces["##" + w[i : i + n]] += c
    for tok, _ in sorted(pieces.items(), key=lambda kv: (-kv[1], -len(kv[0]), kv[0])):
        if len(vocab) >= vocab_size:
            break
        add(tok)
    return vocab


def build_tokenizer(*, extra_special_tokens: Sequence[str] = (), model_max_length: int = MODEL_MAX_LENGTH):
    """Cased WordPiece tokenizer built locally, wrapped as ``BertTokenizerFast``.

    ``extra_special_tokens`` (e.g. ColBERT's ``[unused0]``/``[unused1]``) are real
    vocabulary entries with the ids right after ``[PAD] [UNK] [CLS] [SEP] [MASK]``
    (0..4), registered as special tokens so they are never split.  Deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    extra = [t for t in extra_special_tokens if t not in SPECIAL_TOKENS]
    vocab = train_wordpiece_vocab(specials=SPECIAL_TOKENS + extra)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    kwargs = dict(
        do_lower_case=False,
        strip_accents=False,
        tokenize_chinese_chars=True,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )
    if extra:
        kwargs["additional_special_tokens"] = list(extra)
    return BertTokenizerFast(tokenizer_object=tok, **kwargs)


def _write_vocab_txt(tokenizer, out: Path) -> None:
    """vocab.txt like real BERT checkpoints (transformers 5 only writes tokenizer.json).

    Holds the WordPiece vocabulary in id order; tokens added later with
    ``add_tokens`` (PyLate's prefixes) live only in tokenizer.json, as in real folders.
    """
    if (out / "vocab.txt").exists():
        return
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    ordered = sorted(vocab.items(), key=lambda kv: kv[1])
    assert [i for _, i in ordered] == list(range(len(ordered)))
    (out / "vocab.txt").write_text("".join(tok + "\n" for tok, _ in ordered), encoding="utf-8")


def _bert_config(vocab_size: int, hidden: int, **extra):
    from transformers import BertConfig

    if hidden % 2:
        raise ValueError("hidden must be divisible by num_attention_heads=2")
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=MODEL_MAX_LENGTH,
        **extra,
    )


def _random_bert(config):
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel(config)
    model.eval()
    return model


def _linear_weight(out_features: int, in_features: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=g) / in_features**0.5).contiguous()


def _state_dict(model, prefix: str = "") -> dict:
    # Contiguous clones: safetensors refuses shared / non-contiguous storage.
    return {prefix + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _save_safetensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def build_tiny_model(
    out_dir: os.PathLike | str,
    *,
    colbert_dim: int | None = None,
    markers: bool = False,
    hidden: int = 32,
    extra_tokens: Iterable[str] = (),
    weights: bool = True,
) -> Path:
    """Build a tiny random BERT encoder folder at ``out_dir`` and return its Path.

    - ``colbert_dim``: if given, Stanford-ColBERT layout (``bert.``-prefixed BERT keys
      plus ``linear.weight`` (colbert_dim x hidden) in model.safetensors,
      ``architectures=["HF_ColBERT"]`` and ``artifact.metadata``); implies ``markers``.
    - ``markers``: put ``[unused0]`` and ``[unused1]`` in the vocabulary (ids 5, 6).
    - ``extra_tokens``: tokens added with ``tokenizer.add_tokens`` (non-special), e.g.
      PyLate's ``"[Q] "``/``"[D] "``; the embedding matrix covers them.
    - ``weights=False``: write config + tokenizer only (for error tests).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markers = markers or colbert_dim is not None
    tokenizer = build_tokenizer(extra_special_tokens=COLBERT_MARKERS if markers else ())
    extra_tokens = list(extra_tokens)
    if extra_tokens:
        tokenizer.add_tokens(extra_tokens)
    config_extra = {}
    if colbert_dim is not None:
        config_extra["architectures"] = ["HF_ColBERT"]
    config = _bert_config(len(tokenizer), hidden, **config_extra)
    tokenizer.save_pretrained(str(out))
    _write_vocab_txt(tokenizer, out)

    if not weights:
        if colbert_dim is None:
            config.architectures = ["BertModel"]
        config.save_pretrained(str(out))
        return out

    model = _random_bert(config)
    if colbert_dim is None:
        model.save_pretrained(str(out))
    else:
        config.save_pretrained(str(out))
        tensors = _state_dict(model, prefix="bert.")
        tensors["linear.weight"] = _linear_weight(colbert_dim, hidden)
        _save_safetensors(tensors, out / "model.safetensors")
        metadata = {
            "query_token_id": COLBERT_MARKERS[0],
            "doc_token_id": COLBERT_MARKERS[1],
            "dim": colbert_dim,
            "query_maxlen": 32,
            "doc_maxlen": 180,
        }
        (out / "artifact.metadata").write_text(json.dumps(metadata, indent=2))
    return out


def build_tiny_colbert(out_dir: os.PathLike | str, *, dim: int = 16, hidden: int = 32) -> Path:
    """Stanford-ColBERT style folder (see module docstring)."""
    return build_tiny_model(out_dir, colbert_dim=dim, markers=True, hidden=hidden)


def build_tiny_pylate(out_dir: os.PathLike | str, *, dim: int = 16, hidden: int = 32) -> Path:
    """PyLate style folder (see module docstring)."""
    out = build_tiny_model(
        out_dir, hidden=hidden, extra_tokens=[PYLATE_QUERY_PREFIX, PYLATE_DOCUMENT_PREFIX]
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    dense = out / "1_Dense"
    dense.mkdir(exist_ok=True)
    (dense / "config.json").write_text(
        json.dumps(
            {
                "in_features": hidden,
                "out_features": dim,
                "bias": False,
                "activation_function": "torch.nn.modules.linear.Identity",
            },
            indent=2,
        )
    )
    _save_safetensors({"linear.weight": _linear_weight(dim, hidden, seed=2)}, dense / "model.safetensors")
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 179, "do_lower_case": False}, indent=2)
    )
    st_config = {
        "__version__": {"pylate": "1.1.4", "sentence_transformers": "3.4.1"},
        "prompts": {},
        "default_prompt_name": None,
        "similarity_fn_name": "MaxSim",
        "query_prefix": PYLATE_QUERY_PREFIX,
        "document_prefix": PYLATE_DOCUMENT_PREFIX,
        "query_length": 32,
        "document_length": 180,
        "attend_to_expansion_tokens": False,
        "skiplist_words": list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
        "do_query_expansion": True,
    }
    (out / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))
    return out


XMOD_LANGUAGES = ("en_XX", "de_DE")


def build_tiny_xmod(
    out_dir: os.PathLike | str,
    *,
    languages: Sequence[str] = XMOD_LANGUAGES,
    colbert_dim: int | None = None,
    hidden: int = 32,
    adapter_scale: float = 20.0,
) -> Path:
    """Tiny random X-MOD encoder (transformers' ``XmodModel``, 2 layers) with one adapter per language.

    ``config.json`` has ``model_type "xmod"`` and ``languages`` (the adapters, in
    ``lang_ids`` order); the tokenizer is the WordPiece one of :func:`build_tokenizer`
    (pad id 0, so ``pad_token_id=0``). The adapters' up-projections (``dense2``) are
    scaled by ``adapter_scale`` after the random init: X-MOD initialises them with std
    0.02, which leaves the adapters' effect on a 2-layer model close to float noise,
    and tests want each language's output to be visibly its adapter's.
    ``colbert_dim`` adds a Stanford-ColBERT ``linear.weight`` (ColBERT-XM's projection)
    and ColBERT markers.
    """
    import torch
    from transformers import XmodConfig, XmodModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(extra_special_tokens=COLBERT_MARKERS if colbert_dim else ())
    tokenizer.save_pretrained(str(out))
    _write_vocab_txt(tokenizer, out)
    config = XmodConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=MODEL_MAX_LENGTH + 2, pad_token_id=0,
        languages=list(languages), default_language=None,
    )
    torch.manual_seed(0)
    model = XmodModel(config)
    with torch.no_grad():
        for layer in model.encoder.layer:
            for adapter in layer.output.adapter_modules.values():
                adapter.dense2.weight.mul_(adapter_scale)
    model.eval()
    if colbert_dim is None:
        model.save_pretrained(str(out))
        return out
    config.save_pretrained(str(out))
    tensors = _state_dict(model, prefix="roberta.")
    tensors["linear.weight"] = _linear_weight(colbert_dim, hidden)
    _save_safetensors(tensors, out / "model.safetensors")
    metadata = {"query_token_id": COLBERT_MARKERS[0], "doc_token_id": COLBERT_MARKERS[1],
                "dim": colbert_dim, "query_maxlen": 32, "doc_maxlen": 180}
    (out / "artifact.metadata").write_text(json.dumps(metadata, indent=2))
    return out


def build_tiny_seq2seq(out_dir: os.PathLike | str, *, hidden: int = 32) -> Path:
    """Tiny random T5 (``T5ForConditionalGeneration``, 2+2 layers) with the WordPiece tokenizer.

    A query generator folder for tests: ``is_encoder_decoder`` true, ``pad_token_id`` 0
    (``[PAD]``, also the decoder start), ``eos_token_id`` 3 (``[SEP]``). Random weights
    generate random word pieces, which is all the generation path needs.
    """
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(out))
    _write_vocab_txt(tokenizer, out)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=hidden, d_kv=hidden // 2, d_ff=2 * hidden, num_layers=2,
        num_decoder_layers=2, num_heads=2, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    model.eval()
    model.save_pretrained(str(out))
    return out


def build_tiny_model_no_weights(out_dir: os.PathLike | str, *, hidden: int = 32) -> Path:
    """Config + tokenizer, no weight file: loading the model must fail."""
    return build_tiny_model(out_dir, hidden=hidden, weights=False)


__all__ = [
    "ALL_TEXTS",
    "COLBERT_MARKERS",
    "MULTILINGUAL_TEXTS",
    "PYLATE_DOCUMENT_PREFIX",
    "PYLATE_QUERY_PREFIX",
    "build_tiny_colbert",
    "build_tiny_model",
    "build_tiny_model_no_weights",
    "build_tiny_pylate",
    "build_tiny_seq2seq",
    "build_tiny_xmod",
    "build_tokenizer",
    "train_wordpiece_vocab",
]
