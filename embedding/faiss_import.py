"""``import faiss`` with a one-line answer when it is missing.

faiss is not a plain dependency: ``faiss-cpu`` and ``faiss-gpu`` both provide the module
``faiss``, so the user picks one through an extra (pyproject.toml). ``pip install tessera``
without one gives a CLI whose jobs would die on ``ModuleNotFoundError: No module named
'faiss'``; :func:`import_faiss` says which extra to install instead.
"""
from __future__ import annotations

import importlib
from types import ModuleType

HINT = "pip install 'tessera[cpu]' (or 'tessera[gpu]' on a CUDA machine)"


class FaissMissing(ModuleNotFoundError):
    """faiss is not installed; the message names the extras that install it.

    The CLI reports it as bad input (exit 2), like the other errors the user fixes by
    changing what they run (see ``jobs.errors.bad_input``).
    """


def import_faiss() -> ModuleType:
    """The ``faiss`` module; raises :class:`FaissMissing` when it is not installed.

    Only a missing ``faiss`` itself is translated: a faiss that is installed but fails to
    load (a missing shared library, a CUDA mismatch) keeps its own error.
    """
    try:
        return importlib.import_module("faiss")
    except ModuleNotFoundError as err:
        if err.name != "faiss":
            raise
        raise FaissMissing(f"faiss is not installed: {HINT}", name="faiss") from None
