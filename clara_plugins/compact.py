"""Compact memories and a compact search index, so that a store of millions of passages fits
one machine.

- ``quantize`` / ``dequantize``: int8 memories with one scale per memory vector. At CR16 a
  passage's memory takes 9,216 + 64 bytes instead of 18,432 in fp16. A scale per vector,
  rather than per passage, follows the vectors' own ranges: the backbone's hidden states have
  a few dimensions far larger than the rest, and their size varies from vector to vector. On
  real CR16 memories the error was 2.7 % of the memory's norm (4.1 % with one scale per
  passage), and the keys kept a cosine of at least 0.9994 to the fp16 ones.
- ``CompactIndex``: approximate search over the keys (CLaRa's key is the normalised mean or
  flattened memory) in PROJECTED_DIMS / 4 bytes per passage, whose candidates the store re-scores
  exactly from the stored memories.
"""

from __future__ import annotations

import faiss
import numpy as np

PROJECTED_DIMS = 512  # values per key the index quantises: 16 memory vectors x 32 of a flattened CR16 key, 512 of a mean key's 576
TRAINING_ROWS = 8192  # keys, spread evenly over the store, that the projection and the codebooks learn from
MIN_ROWS = 1024  # below this the store searches exactly (4-bit codebooks want 16 x 39 training keys)
RETRAIN_GROWTH = 2  # a store this many times the rows its index learned from trains the index again
QUANTIZE_ROWS = 1024  # memories quantised at a time: the float32 copies are of these, not of a whole upsert


def quantize(memories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes [..., width] and float32 scales [...] of memories: each vector divided by its
    largest absolute value / 127, then rounded. Read QUANTIZE_ROWS rows at a time: an upsert of
    100,000 CR16 passages held float32 copies of all of them (3.7 GB each, beside 1.8 GB of fp16)."""
    memories = np.asarray(memories)
    codes, scales = np.empty(memories.shape, dtype=np.int8), np.empty(memories.shape[:-1], dtype=np.float32)
    for start in range(0, len(memories), QUANTIZE_ROWS):
        part = memories[start:start + QUANTIZE_ROWS].astype(np.float32)
        scales[start:start + QUANTIZE_ROWS] = np.abs(part).max(axis=-1) / 127.0
        part /= np.maximum(scales[start:start + QUANTIZE_ROWS], np.finfo(np.float32).tiny)[..., None]
        codes[start:start + QUANTIZE_ROWS] = np.rint(part)
    return codes, scales


def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 memories back from int8 codes and their scales."""
    return codes.astype(np.float32) * scales[..., None]


class CompactIndex:
    """Approximate inner-product search over unit-norm keys, in PROJECTED_DIMS / 4 bytes per key.

    A key is ``blocks`` vectors of one space laid end to end (CLaRa's: one per memory token,
    in the backbone's hidden space). The index centres the keys on their mean, projects each
    vector on the space's top principal directions (one projection for all blocks, so it stays
    small: width x r floats), and rotates them at random so that every coordinate carries a
    like share of the variance. faiss's fast-scan product quantiser then keeps 4 bits per pair
    of coordinates (128 bytes per key at CR16), and a search scans every code. IVF lists found
    too few neighbours: probing a third of 100 lists reached only 81-87 % of the exact top 10
    of 10k passages drawn from real memories, while a full scan of these codes takes about
    8 ms per million keys on one core.

    Queries are projected but not centred: subtracting the mean from every key lowers every
    score by the same <query, mean>, so the ranking is unchanged.
    """

    def __init__(self, centre: np.ndarray, projection: np.ndarray, codes: faiss.Index, trained_over: int) -> None:
        if centre.ndim != 2 or projection.ndim != 2 or projection.shape[0] != centre.shape[1]:
            raise ValueError(f"a centre of shape {centre.shape} does not fit a projection of shape {projection.shape}")
        if codes.d != centre.shape[0] * projection.shape[1]:
            raise ValueError(f"the codes have {codes.d} dimensions, the projection gives "
                             f"{centre.shape[0] * projection.shape[1]}")
        self.centre = centre  # [blocks, width]
        self.projection = projection  # [width, r]
        self.codes = codes
        self.trained_over = trained_over  # rows of the store its training keys were drawn from

    @classmethod
    def trained(cls, keys: np.ndarray, blocks: int, trained_over: int) -> "CompactIndex":
        """An empty index whose projection and codebooks are learned from ``keys`` [n, blocks * width],
        drawn from a store of ``trained_over`` rows."""
        vectors = keys.reshape(len(keys), blocks, -1)
        centre = vectors.mean(axis=0)
        centred = (vectors - centre).reshape(-1, vectors.shape[2])
        _, directions = np.linalg.eigh((centred.T @ centred).astype(np.float64))  # ascending variance
        # a coordinate a block at least (past 512 blocks none was kept: faiss aborted), and an
        # even count, which pairs into 4-bit codes (an odd one took a sub-quantiser per value)
        kept = max(1, min(vectors.shape[2], PROJECTED_DIMS // blocks))
        if blocks * kept % 2 and kept > 1:
            kept -= 1
        rotation, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((kept, kept)))
        projection = (directions[:, ::-1][:, :kept] @ rotation).astype(np.float32)
        dims = blocks * kept
        codes = faiss.IndexPQFastScan(dims, dims // 2 if dims % 2 == 0 else dims, 4, faiss.METRIC_INNER_PRODUCT)
        index = cls(centre.astype(np.float32), projection, codes, trained_over)
        codes.train(index._projected(keys, centred=True))
        return index

    def add(self, keys: np.ndarray) -> None:
        """Append keys [n, blocks * width]; they take the next row numbers."""
        self.codes.add(self._projected(keys, centred=True))

    @property
    def ntotal(self) -> int:
        return self.codes.ntotal

    def candidates(self, query: np.ndarray, n: int) -> np.ndarray:
        """Rows of the n keys that score best against a query key by the codes, roughly best first."""
        _, rows = self.codes.search(self._projected(query[None], centred=False), min(n, self.ntotal))
        return rows[0][rows[0] >= 0]

    def _projected(self, keys: np.ndarray, centred: bool) -> np.ndarray:
        vectors = keys.reshape(len(keys), *self.centre.shape)
        if centred:
            vectors = vectors - self.centre
        return np.ascontiguousarray((vectors @ self.projection).reshape(len(keys), -1), dtype=np.float32)
