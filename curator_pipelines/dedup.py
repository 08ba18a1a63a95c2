"""Stage 5: exact (normalised hash) and fuzzy (MinHash + LSH) deduplication on CPU.

Records are visited in corpus order (problem, then sample index) and the first of a group is kept,
so a rerun removes exactly the same records. The document of a record is its problem plus its
response: the same trace for two different problems is not a duplicate. Fuzzy candidates from LSH
are verified with the exact Jaccard similarity of their shingle sets, so the verdict does not
depend on MinHash's sampling error. (NeMo Curator's own exact/fuzzy dedup workflows run on
cuDF and need a GPU; this stage is the CPU path with the same semantics.)
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata

from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import DocumentBatch

from curator_pipelines.config import DedupConfig
from curator_pipelines.records import apply_verdicts

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def document(problem: str, response: str) -> str:
    return normalize(problem) + "\n" + normalize(response or "")


def exact_key(problem: str, response: str) -> str:
    return hashlib.sha256(document(problem, response).encode()).hexdigest()


def shingles(text: str, k: int) -> set[str]:
    if len(text) <= k:
        return {text}
    return {text[i : i + k] for i in range(len(text) - k + 1)}


def jaccard(a: set, b: set) -> float:
    if not (a or b):
        return 1.0
    inter = len(a & b)  # |a | b| from the sizes: no union set is built (this runs per LSH candidate)
    return inter / (len(a) + len(b) - inter)


def exact_duplicates(docs: list[tuple[int, str, str]]) -> dict[int, tuple[bool, float, str]]:
    """(position, problem, response) in corpus order -> verdicts; the first copy passes."""
    seen: dict[str, int] = {}
    out = {}
    for pos, problem, response in docs:
        key = exact_key(problem, response)
        if key in seen:
            out[pos] = (False, 1.0, "exact_duplicate")
        else:
            seen[key] = pos
            out[pos] = (True, 0.0, "")
    return out


def _compact(text: str) -> str:
    """Lower case, no whitespace: spacing and layout do not make two traces different."""
    return _WS.sub("", unicodedata.normalize("NFKC", text or "").lower())


def fuzzy_duplicates(docs: list[tuple[int, str, str]], cfg: DedupConfig) -> dict[int, tuple[bool, float, str]]:
    """Near duplicates: an earlier kept record with a similar problem AND a similar response.

    MinHash + LSH over the shingles of problem + response finds candidates; a candidate is a
    duplicate when the exact Jaccard similarity of the problems' shingles and of the responses'
    shingles are both >= cfg.threshold (the chat template's tags are shared by every response, so
    the response alone must not decide that two short traces of different problems are alike).
    """
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=cfg.lsh_threshold, num_perm=cfg.num_perm)
    template = MinHash(num_perm=cfg.num_perm, seed=1)  # permutations drawn once, not per record
    kept: dict[int, tuple[set[str], set[str]]] = {}
    out = {}
    for pos, problem, response in docs:
        p_sh = shingles(_compact(problem), cfg.shingle_chars)
        r_sh = shingles(_compact(response), cfg.shingle_chars)
        mh = MinHash(num_perm=cfg.num_perm, seed=1, permutations=template.permutations, scheme=template.scheme)
        mh.update_batch([("p:" + s).encode() for s in p_sh] + [("r:" + s).encode() for s in r_sh])
        best, best_j = None, 0.0
        for cand in sorted(lsh.query(mh)):
            cp, cr = kept[cand]
            # short, similar traces give many candidates: the (short) problems decide most of them, and
            # min(p, r) cannot beat best_j when p does not
            j = jaccard(p_sh, cp)
            if j <= best_j:
                continue
            j = min(j, jaccard(r_sh, cr))
            if j > best_j:
                best, best_j = cand, j
        if best is not None and best_j >= cfg.threshold:
            out[pos] = (False, best_j, "near_duplicate")
        else:
            out[pos] = (True, best_j, "")
            lsh.insert(pos, mh)
            kept[pos] = (p_sh, r_sh)
    return out


class DedupStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    resources = Resources(cpus=1.0)

    def __init__(self, kind: str, cfg: DedupConfig):
        if kind not in ("exact", "fuzzy"):
            raise ValueError(f"dedup kind must be 'exact' or 'fuzzy', got {kind!r}")
        self.name = f"dedup_{kind}"
        self.kind = kind
        self.cfg = cfg

    def process(self, task: DocumentBatch) -> DocumentBatch:
        started = time.perf_counter()
        df = task.to_pandas()
        docs = [(pos, p, r) for pos, (p, r, k) in enumerate(zip(df["problem"], df["response"], df["kept"])) if k]
        verdicts = exact_duplicates(docs) if self.kind == "exact" else fuzzy_duplicates(docs, self.cfg)
        metadata = dict(task._metadata)
        out = apply_verdicts(df, self.name, verdicts, metadata, started)
        return DocumentBatch(dataset_name=task.dataset_name, data=out, _metadata=metadata)


def dedup_stages(cfg: DedupConfig) -> list[DedupStage]:
    if cfg.backend == "gpu":
        raise ValueError("dedup.backend=gpu: Curator's cuDF dedup needs a GPU and the cudf package; "
                         "use backend=cpu (or auto) on this machine")
    return [DedupStage(kind, cfg) for kind in ("exact", "fuzzy") if getattr(cfg, kind)]
