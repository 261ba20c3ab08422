"""RSS of a serving process's steps, naming results by read_doc_ids (arrays) or read_ids (Parquet)."""
import sys, numpy as np
sys.path.insert(0, "/work/main")
def rss():
    for l in open('/proc/self/status'):
        if l.startswith('VmRSS'): return int(l.split()[1]) / 1024
def hwm():
    for l in open('/proc/self/status'):
        if l.startswith('VmHWM'): return int(l.split()[1]) / 1024
how = sys.argv[1]
steps = [("start", rss())]
from indexing import index_files, plaid  # noqa
from storage import layout
from storage.manifest import Artifact
steps.append(("engine import", rss()))
ci, m = index_files.open_centroid_index("/tmp/vs-root", "tat2-plaid")
vdir = Artifact(layout.resolve_root("/tmp/vs-root"), "indexes", "tat2-plaid").version_dir(m["version"])
steps.append(("index open", rss()))
ids = index_files.read_doc_ids(vdir, m) if how == "arrays" else index_files.read_ids(vdir, m).to_pylist()
steps.append((f"ids ({how})", rss()))
Q = np.load("/tmp/vs-work-tat2/queries.npy")
for q in Q: ci.search(q[None], 10)
steps.append(("300 queries", rss()))
print(how, " | ".join(f"{k} {v:.1f}" for k, v in steps), f"| peak {hwm():.1f}", "| pyarrow" if "pyarrow" in sys.modules else "")
