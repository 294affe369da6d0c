"""Step 3: exact and near-duplicate removal (MinHash LSH), vectorised with numpy.

Texts are normalised (lower case, punctuation and whitespace runs become one space) and
split into words. *Exact* duplicates share the normalised text. *Near* duplicates share most
word shingles (``ngram`` consecutive words): their Jaccard similarity is estimated with MinHash
signatures and candidate pairs are found by LSH banding, then confirmed on their shingles
(on the signatures alone for completions of different parts). The first occurrence of every
group is kept.

Per-record MinHash objects in Python cost ~1 ms each; here all shingles of a batch of texts are
hashed at once (multiply-shift hashing on uint64), which does 100k texts in a few seconds.

Words are hashed (not numbered in order of appearance), so signatures and exact-text hashes
computed in different processes compare: :func:`text_hashes`, :func:`signatures` and
:func:`band_keys` are what ``build`` stores per text for duplicates across parts, :func:`mix`
joins a group (a prompt) into those keys, :func:`duplicate_pairs` finds the texts that share a
key with a Ray Data shuffle, and :func:`near_duplicate_pairs` confirms the near ones.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from llmdistill.builder.workfiles import read_arrow

_SEPARATORS = re.compile(r"[\W_]+")
_MIX = np.uint64(0x9E3779B97F4A7C15)
_CHUNK_SHINGLES = 1 << 13


def normalize(text: str) -> str:
    """Lower case; every run of punctuation/whitespace becomes one space."""
    return _SEPARATORS.sub(" ", text.lower()).strip()


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def word_ids(texts: list[str], normalized: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Words of the normalised texts as 64-bit hashes (odd, so never 0), flat, with offsets per text.

    The same word gets the same id in every call and every process.
    """
    vocab: dict[str, int] = {}
    flat: list[int] = []
    offsets = [0]
    for text in texts:
        for w in (text if normalized else normalize(text)).split():
            wid = vocab.get(w)
            if wid is None:
                wid = vocab[w] = _hash64(w) | 1
            flat.append(wid)
        offsets.append(len(flat))
    return np.asarray(flat, dtype=np.uint64), np.asarray(offsets, dtype=np.int64)


def text_hashes(texts: list[str], normalized: bool = False) -> np.ndarray:
    """A 64-bit hash of each normalised text: equal for exact duplicates, in every process."""
    return np.fromiter((_hash64(t if normalized else normalize(t)) for t in texts), dtype=np.uint64, count=len(texts))


def signatures(texts: list[str], ngram: int, num_perm: int, seed: int = 0, normalized: bool = False) -> np.ndarray:
    """MinHash signatures (n, num_perm) uint32 of the texts' word shingles (see :func:`minhash_signatures`)."""
    words, offsets = word_ids(texts, normalized)
    hashes, starts = shingle_hashes(words, offsets, ngram)
    return minhash_signatures(hashes, starts, num_perm, seed)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each pair ``(a, b)`` (broadcast): how a group joins a key (exact-text hash
    or LSH band key), so texts of different groups never share a bucket."""
    with np.errstate(over="ignore"):
        return _splitmix(np.asarray(a).astype(np.uint64) * _MIX + np.asarray(b).astype(np.uint64))


def shingle_hashes(words: np.ndarray, offsets: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every ``ngram``-word shingle of every text.

    A text shorter than ``ngram`` words is one shingle (all its words); an empty text is one
    empty shingle, so every text has at least one.

    Returns:
        ``hashes`` (n_shingles,) uint64 and ``starts`` (n_texts,) index of each text's first shingle.
    """
    lengths = np.diff(offsets)
    n_texts = len(lengths)
    # texts laid out with ``ngram`` zero words after each, so a window never mixes two texts
    slot = lengths + ngram
    base = np.concatenate([[0], np.cumsum(slot)[:-1]]).astype(np.int64)
    padded = np.zeros(int(slot.sum()) + ngram, dtype=np.uint64)
    text_of_word = np.repeat(np.arange(n_texts), lengths)
    padded[base[text_of_word] + (np.arange(len(words)) - offsets[:-1][text_of_word])] = words
    h = np.zeros(len(padded) - ngram, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(ngram):
            h = _splitmix(h * _MIX + padded[j:j + len(h)])
    counts = np.maximum(lengths - ngram + 1, 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    text_of_shingle = np.repeat(np.arange(n_texts), counts)
    positions = base[text_of_shingle] + (np.arange(int(counts.sum())) - starts[text_of_shingle])
    return h[positions], starts


def minhash_signatures(hashes: np.ndarray, starts: np.ndarray, num_perm: int, seed: int = 0) -> np.ndarray:
    """MinHash signatures: per text, the minimum of ``num_perm`` hash permutations of its shingles.

    Permutation ``p`` maps the (already well-mixed) 32-bit shingle hash ``x`` to
    ``a_p * x + b_p mod 2**32`` with ``a_p`` odd, a bijection; uint32 arithmetic keeps the
    (n_shingles, num_perm) block small and fast. The estimate ``mean(sig(A) == sig(B))`` is
    unbiased with the textbook standard deviation ``sqrt(J (1 - J) / num_perm)``
    (checked in the tests).

    Returns:
        uint32 array (n_texts, num_perm).
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    x = (hashes >> np.uint64(32)).astype(np.uint32)
    n_texts = len(starts)
    ends = np.append(starts[1:], len(x))
    sig = np.empty((n_texts, num_perm), dtype=np.uint32)
    buf = np.empty((_CHUNK_SHINGLES, num_perm), dtype=np.uint32)
    t0 = 0
    while t0 < n_texts:  # batches of whole texts, about _CHUNK_SHINGLES shingles each (cache-sized)
        t1 = max(int(np.searchsorted(ends, starts[t0] + _CHUNK_SHINGLES, side="right")), t0 + 1)
        lo, hi = starts[t0], ends[t1 - 1]
        block = buf[:hi - lo] if hi - lo <= len(buf) else np.empty((hi - lo, num_perm), dtype=np.uint32)
        with np.errstate(over="ignore"):
            np.multiply(x[lo:hi, None], a, out=block)
            block += b
        sig[t0:t1] = np.minimum.reduceat(block, starts[t0:t1] - lo, axis=0)
        t0 = t1
    return sig


def lsh_params(threshold: float, num_perm: int, max_miss: float = 0.01) -> tuple[int, int]:
    """LSH banding: ``(bands, rows)`` with the most rows per band (the fewest false candidates)
    such that a pair at ``threshold`` becomes a candidate with probability >= ``1 - max_miss``.
    False candidates cost only time: every candidate pair is confirmed on its shingles."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if (1.0 - threshold**rows) ** bands <= max_miss:
            best = (bands, rows)
    return best


def _components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Connected components of a graph as the smallest node index of each node's component."""
    label = np.arange(n)
    while True:
        before = label.copy()
        np.minimum.at(label, left, label[right])
        np.minimum.at(label, right, label[left])
        label = label[label]
        if np.array_equal(label, before):
            return label


def pair_jaccard(hashes: np.ndarray, starts: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Jaccard similarity of the shingle-hash sets of text pairs ``(left[j], right[j])``, vectorised."""
    n = len(starts)
    text = np.repeat(np.arange(n), np.diff(np.append(starts, len(hashes))))
    order = np.lexsort((hashes, text))
    h, t = hashes[order], text[order]
    first = np.ones(len(h), dtype=bool)
    first[1:] = (h[1:] != h[:-1]) | (t[1:] != t[:-1])
    h, t = h[first], t[first]  # each text's set of shingles, sorted
    set_start, set_size = np.searchsorted(t, np.arange(n)), np.bincount(t, minlength=n)

    def gather(side: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = set_size[side]
        pair = np.repeat(np.arange(len(side)), size)
        offset = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
        return pair, h[set_start[side][pair] + offset]

    pair_a, hash_a = gather(left)
    pair_b, hash_b = gather(right)
    pair, hh = np.concatenate([pair_a, pair_b]), np.concatenate([hash_a, hash_b])
    order = np.lexsort((hh, pair))
    pair, hh = pair[order], hh[order]
    shared = (pair[1:] == pair[:-1]) & (hh[1:] == hh[:-1])
    inter = np.bincount(pair[1:][shared], minlength=len(left))
    return inter / (set_size[left] + set_size[right] - inter)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """LSH bucket of every text in every band: (n, bands) uint64, a hash of the band's values and its index.

    Two texts share a bucket in some band with probability ``1 - (1 - J**rows)**bands``.
    """
    keys = np.zeros((sig.shape[0], bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            bucket = np.full(sig.shape[0], band + 1, dtype=np.uint64)
            for col in range(band * rows, (band + 1) * rows):
                bucket = _splitmix(bucket * _MIX + sig[:, col].astype(np.uint64))
            keys[:, band] = bucket
    return keys


def _candidate_pairs(sig: np.ndarray, idx: np.ndarray, bands: int, rows: int,
                     groups: np.ndarray | None = None) -> np.ndarray:
    """Pairs (earlier, later) of texts sharing an LSH bucket, each paired with its bucket's first text.

    With ``groups``, the group is hashed into every band key (:func:`mix`, as the buckets across
    parts are), so a bucket holds texts of one group only and its first text is of that group.
    """
    n = sig.shape[0]
    keys = []
    buckets = band_keys(sig[idx], bands, rows)
    if groups is not None:
        buckets = mix(groups[idx][:, None], buckets)
    for band in range(bands):
        _, first, inverse = np.unique(buckets[:, band], return_index=True, return_inverse=True)
        head = first[inverse]
        later = head != np.arange(len(idx))
        keys.append(idx[head[later]].astype(np.int64) * n + idx[later])
    unique = np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
    return np.stack([unique // n, unique % n], axis=1)


def estimate_slack(threshold: float, num_perm: int) -> float:
    """How far below ``threshold`` a MinHash estimate may lie for its pair to be confirmed on the
    shingles: 4 standard deviations ``sqrt(J (1 - J) / num_perm)`` (at least those of J(1 - J) = 0.01)."""
    return 4.0 * float(np.sqrt(max(threshold * (1 - threshold), 0.01) / num_perm))


def near_duplicates(hashes: np.ndarray, starts: np.ndarray, sig: np.ndarray, threshold: float,
                    candidates: np.ndarray | None = None, groups: np.ndarray | None = None) -> np.ndarray:
    """Which texts are near-duplicates of an earlier text.

    Candidate pairs come from LSH banding of the signatures; a pair whose MinHash estimate is
    far below ``threshold`` is discarded, the others are confirmed on their exact shingle sets.

    Args:
        hashes, starts: the shingle hashes of :func:`shingle_hashes`.
        sig: MinHash signatures (n, num_perm).
        threshold: Jaccard similarity at or above which two texts are duplicates.
        candidates: optional bool mask (n,) of the texts taking part.
        groups: optional int array (n,): only texts of the same group can be duplicates.

    Returns:
        bool array (n,): True for every text but the first of its group of near-duplicates.
    """
    n, num_perm = sig.shape
    idx = np.flatnonzero(candidates) if candidates is not None else np.arange(n)
    pairs = _candidate_pairs(sig, idx, *lsh_params(threshold, num_perm), groups=groups)
    if groups is not None:  # a collision of two 64-bit keys aside, the pairs are all within a group
        pairs = pairs[groups[pairs[:, 0]] == groups[pairs[:, 1]]]
    if len(pairs):
        estimate = (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1)
        pairs = pairs[estimate >= threshold - estimate_slack(threshold, num_perm)]
        pairs = pairs[pair_jaccard(hashes, starts, pairs[:, 0], pairs[:, 1]) >= threshold]
    label = _components(n, pairs[:, 0], pairs[:, 1]) if len(pairs) else np.arange(n)
    return label != np.arange(n)


def exact_duplicates(texts: list[str], groups: np.ndarray | None = None, normalized: bool = False) -> np.ndarray:
    """True for every text whose normalised form appeared earlier (in the same group, if given)."""
    seen: set[tuple[int, str]] = set()
    dup = np.zeros(len(texts), dtype=bool)
    group_of = groups.tolist() if groups is not None else [0] * len(texts)
    for i, text in enumerate(texts):
        key = (group_of[i], text if normalized else normalize(text))
        dup[i] = key in seen
        seen.add(key)
    return dup


def duplicates(texts: list[str], near: bool, threshold: float, ngram: int, num_perm: int, seed: int = 0,
               groups: np.ndarray | None = None) -> np.ndarray:
    """Exact duplicates, plus near-duplicates (among the remaining texts) when ``near``.

    Args:
        texts: the texts, in priority order (the first of a group of duplicates is kept).
        near: also find near-duplicates with MinHash LSH.
        threshold: Jaccard similarity of shingle sets at which texts are near-duplicates.
        ngram: words per shingle.
        num_perm: MinHash permutations.
        seed: seed of the permutations.
        groups: optional int array: texts of different groups are never duplicates.

    Returns:
        bool array: True for texts to drop (a duplicate of an earlier one).
    """
    texts = [normalize(t) for t in texts]
    dup = exact_duplicates(texts, groups, normalized=True)
    if near and len(texts) > 1:
        words, offsets = word_ids(texts, normalized=True)
        hashes, starts = shingle_hashes(words, offsets, ngram)
        sig = minhash_signatures(hashes, starts, num_perm, seed)
        dup |= near_duplicates(hashes, starts, sig, threshold, candidates=~dup, groups=groups)
    return dup


def jaccard(a: str, b: str, ngram: int) -> float:
    """Exact Jaccard similarity of two texts' word shingles (the quantity MinHash estimates)."""
    def shingles(text: str) -> set[tuple[str, ...]]:
        words = normalize(text).split()
        if len(words) < ngram:
            return {tuple(words)}
        return {tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


# ---------------------------------------------------------------------------------------
# Duplicates across parts: a Ray Data hash shuffle by key (completions in phase C, prompts in phase A)

# about the most bytes one block of the dedup shuffle holds (the hash shuffle never splits a block)
SHUFFLE_BLOCK_BYTES = 128 << 20


def shuffle_blocks(n: int, bytes_per_trace: int, cpus: int) -> int:
    """Blocks of the shuffle of ``n`` traces' records: one per 50k traces up to two per CPU, and at
    least enough that no block holds more than :data:`SHUFFLE_BLOCK_BYTES` on average, so the memory
    of a task stays bounded however large the input is."""
    by_size = -(-n * bytes_per_trace // SHUFFLE_BLOCK_BYTES)
    return max(1, min(cpus * 2, n // 50_000 + 1), by_size)


def _key_rows(batch: dict[str, np.ndarray], near: bool, bands: int, rows_per_band: int) -> pa.Table:
    """One part's candidate texts as (key, row) records: its exact key, or one per LSH band.

    The task names a keys file (columns ``row``, ``hash``, ``sig``), its candidate ``rows`` (sorted),
    their ``groups`` and their global ``index``, by which the earliest text of a bucket is kept."""
    task = pickle.loads(batch["task"][0])
    keys = read_arrow(task["path"])
    local = keys.column("row").to_numpy()
    pick = np.flatnonzero(np.isin(local, task["rows"]))
    position = np.searchsorted(task["rows"], local[pick])
    group, row = task["groups"][position], task["index"][position]
    if not near:
        return pa.table({"key": mix(group, keys.column("hash").to_numpy()[pick]), "row": row})
    width = keys.schema.field("sig").type.list_size
    sig = keys.column("sig").combine_chunks().flatten().to_numpy().reshape(-1, width)[pick]
    key = mix(group[:, None], band_keys(sig, bands, rows_per_band)).reshape(-1)
    return pa.table({"key": key, "row": np.repeat(row, bands)})


def _bucket_pairs(block: pa.Table) -> pa.Table:
    """Within one block of whole buckets: the pair (first, other) of every other text of a bucket."""
    key, row = block.column("key").to_numpy(), block.column("row").to_numpy()
    order = np.lexsort((row, key))
    key, row = key[order], row[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    sizes = np.diff(np.r_[starts, len(key)])
    member = np.repeat(sizes > 1, sizes) & ~np.isin(np.arange(len(row)), starts)
    head = np.repeat(row[starts], sizes)
    return pa.table({"a": head[member], "b": row[member]})


def _bucket_pair_batches(tasks: list[dict[str, Any]], near: bool, cfg: Any, runtime: Any) -> Iterator[np.ndarray]:
    """The pairs (first, other) of texts sharing a bucket, one block of the shuffle at a time."""
    import ray.data

    bands, rows_per_band = lsh_params(cfg.dedup_threshold, cfg.minhash_num_perm)
    items = [{"task": pickle.dumps(t)} for t in tasks]
    blocks = shuffle_blocks(sum(len(t["rows"]) for t in tasks), 16 * (bands if near else 1), runtime.cpus)
    dataset = (ray.data.from_items(items, override_num_blocks=len(items))
               .map_batches(_key_rows, batch_size=1, batch_format="numpy",
                            fn_kwargs={"near": near, "bands": bands, "rows_per_band": rows_per_band})
               .repartition(blocks, keys=["key"])
               .map_batches(_bucket_pairs, batch_size=None, batch_format="pyarrow"))
    for batch in dataset.iter_batches(batch_format="numpy", batch_size=None):
        yield np.stack([batch["a"], batch["b"]], axis=1).astype(np.int64)


def duplicate_pairs(tasks: list[dict[str, Any]], cfg: Any, runtime: Any) -> np.ndarray:
    """Pairs (earlier, later) of exact duplicates among the tasks' candidates (see :func:`_key_rows`): a
    Ray Data hash shuffle of 16-byte (exact-text hash, row) records whose blocks hold whole buckets; only
    the pairs come back, no process holds an index of all the texts (``cfg``: the build's dedup settings)."""
    found = list(_bucket_pair_batches(tasks, False, cfg, runtime))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def near_duplicate_pairs(tasks: list[dict[str, Any]], cfg: Any, runtime: Any, exact: bool) -> np.ndarray:
    """Pairs (earlier, later) of near-duplicates among the tasks' candidates: the same shuffle by LSH
    band key (16 bytes a record, one per band), each block's candidate pairs confirmed on the driver as
    it arrives (:func:`confirm_candidates`), so the driver holds one block's candidates and the confirmed
    pairs, never every candidate."""
    confirmed = [np.zeros((0, 2), dtype=np.int64)]
    if tasks:
        stored = StoredKeys(tasks)
        for candidates in _bucket_pair_batches(tasks, True, cfg, runtime):
            confirmed.append(confirm_candidates(candidates, stored, cfg.dedup_threshold, cfg.minhash_num_perm, exact))
    return np.unique(np.concatenate(confirmed), axis=0)


def gather(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``values[lo[i]:hi[i]]`` of every ``i``, joined, and the offsets of each (n + 1)."""
    size = (hi - lo).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(size)]).astype(np.int64)
    return values[np.repeat(lo - offsets[:-1], size) + np.arange(offsets[-1])], offsets


class StoredKeys:
    """The signatures, and shingle hashes where stored, of the tasks' texts by global index, read from
    their keys files (memory-mapped: only the rows asked for are touched). Memory: 20 bytes per text."""

    def __init__(self, tasks: list[dict[str, Any]]) -> None:
        self.tasks = tasks
        index = np.concatenate([t["index"] for t in tasks]).astype(np.int64)
        order = np.argsort(index)
        self.index = index[order]
        self.task = np.repeat(np.arange(len(tasks), dtype=np.int32), [len(t["index"]) for t in tasks])[order]
        self.row = np.concatenate([t["rows"] for t in tasks]).astype(np.int64)[order]
        self._files: dict[int, tuple[np.ndarray, ...]] = {}

    def _file(self, i: int) -> tuple[np.ndarray, ...]:
        if i not in self._files:
            table = read_arrow(self.tasks[i]["path"])

            def one(name: str) -> Any:
                column = table.column(name)
                return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()

            sig = one("sig")
            found = (one("row").to_numpy(), sig.values.to_numpy().reshape(len(sig), sig.type.list_size))
            if "shingles" in table.column_names:
                shingles = one("shingles")
                found += (shingles.offsets.to_numpy(), shingles.values.to_numpy())
            self._files[i] = found
        return self._files[i]

    def texts(self, ids: np.ndarray, shingles: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The shingle hashes (flat; empty unless ``shingles``), their starts and the signatures of the
        texts of global indices ``ids`` (sorted), in that order."""
        at = np.searchsorted(self.index, ids)
        task, row = self.task[at], self.row[at]
        order = np.argsort(task, kind="stable")
        pieces, sigs = [], []
        for i in np.unique(task):
            stored = self._file(int(i))
            position = np.searchsorted(stored[0], row[order][task[order] == i])  # the rows' places in the file
            sigs.append(stored[1][position])
            if shingles:
                pieces.append(gather(stored[3], stored[2][position], stored[2][position + 1]))
        back = np.argsort(order)  # from file order back to the order of ``ids``
        sig = np.concatenate(sigs)[back]
        if not shingles:
            return np.zeros(0, dtype=np.uint64), np.zeros(len(ids), dtype=np.int64), sig
        size = np.concatenate([np.diff(offsets) for _, offsets in pieces])
        start = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
        hashes, offsets = gather(np.concatenate([v for v, _ in pieces]), start[back], start[back] + size[back])
        return hashes, offsets[:-1], sig


#: Candidate pairs confirmed together: only their texts' signatures (and shingles) are in memory.
PAIRS_AT_ONCE = 4096


def confirm_candidates(pairs: np.ndarray, stored: StoredKeys, threshold: float, num_perm: int,
                       exact: bool) -> np.ndarray:
    """The candidate pairs that are near-duplicates, confirmed :data:`PAIRS_AT_ONCE` at a time from the
    keys files ``stored`` reads.

    ``exact`` (the keys files hold the texts' ``shingles``: prompts, phase A): a pair is confirmed as
    :func:`near_duplicates` confirms it within one process, dropped when its MinHash estimate lies
    far below ``threshold`` (:func:`estimate_slack`), then kept when its exact Jaccard similarity
    reaches it. Otherwise (completions, whose shingles would cost more disk than their text) it is
    kept when its MinHash estimate reaches ``threshold``, so a pair within a standard deviation
    ``sqrt(J (1 - J) / num_perm)`` of the threshold can go either way.
    """
    pairs = np.unique(pairs, axis=0)  # a pair shares a bucket in up to every band
    kept = [np.zeros((0, 2), dtype=np.int64)]
    for lo in range(0, len(pairs), PAIRS_AT_ONCE):
        chunk = pairs[lo:lo + PAIRS_AT_ONCE]
        ids = np.unique(chunk)
        hashes, starts, sig = stored.texts(ids, shingles=exact)
        left, right = np.searchsorted(ids, chunk[:, 0]), np.searchsorted(ids, chunk[:, 1])
        estimate = (sig[left] == sig[right]).mean(axis=1)
        if exact:
            similar = estimate >= threshold - estimate_slack(threshold, num_perm)
            if similar.any():
                similar[similar] = pair_jaccard(hashes, starts, left[similar], right[similar]) >= threshold
        else:
            similar = estimate >= threshold
        kept.append(chunk[similar])
    return np.concatenate(kept)


def later_members(pairs: np.ndarray) -> np.ndarray:
    """Rows that are not the first (smallest index) of their connected component of pairs."""
    if not len(pairs):
        return np.zeros(0, dtype=np.int64)
    nodes, inverse = np.unique(pairs.reshape(-1), return_inverse=True)
    edges = inverse.reshape(-1, 2)
    label = _components(len(nodes), edges[:, 0], edges[:, 1])
    return nodes[label != np.arange(len(nodes))]
