"""The index kinds, in one place and importable without faiss (the CLI's choices need them
at parse time). :mod:`indexing.dense` builds the FAISS kinds, :mod:`indexing.plaid` the
centroid index; :mod:`indexing.index_files` stores either."""
from __future__ import annotations

#: FAISS index kinds (indexing.dense).
DENSE_KINDS = ("flat", "ivf", "ivfpq", "hnsw", "int8", "binary")
#: Kinds with inverted lists sized by ``nlist``.
IVF_KINDS = ("ivf", "ivfpq")
#: Kinds whose first-stage scores are approximate, so float rescoring changes them.
RESCORED_KINDS = ("ivfpq", "int8", "binary")
#: Kinds whose stored vectors can be removed by label (an HNSW graph cannot).
SUPPORTS_REMOVE = ("flat", "ivf", "ivfpq", "int8", "binary")
#: The centroid (PLAID-style) index over ColBERT token vectors.
PLAID = "plaid"
#: Every kind ``tessera index --kind`` builds.
INDEX_KINDS = DENSE_KINDS + (PLAID,)
