"""Per-sample teacher logits keyed by sample id (never by batch position). numpy only: both engines use it."""
from __future__ import annotations

import numpy as np


class SoftLabelStore:
    """Dense logits (N x K float32) for a fixed set of sample ids, with a mask (N bool) of which ids have a
    teacher yet.

    ``update`` and ``lookup`` translate ids to rows with a sorted index, so a shuffled loader and
    a server that answers in any order still pair every logit with its own image.
    """

    def __init__(self, sample_ids: np.ndarray, num_classes: int):
        self._order = np.argsort(sample_ids, kind="stable")
        self._sorted = np.asarray(sample_ids)[self._order]
        if len(np.unique(self._sorted)) != len(self._sorted):
            raise ValueError("sample ids must be unique")
        self.logits = np.zeros((len(sample_ids), num_classes), np.float32)
        self.present = np.zeros(len(sample_ids), bool)
        self.round = -1

    def rows(self, sample_ids: np.ndarray) -> np.ndarray:
        """Raises KeyError naming ids this store does not hold."""
        pos = np.searchsorted(self._sorted, sample_ids)
        pos = np.minimum(pos, len(self._sorted) - 1)
        bad = self._sorted[pos] != sample_ids
        if bad.any():
            raise KeyError(f"sample ids not held by this store: {np.asarray(sample_ids)[bad][:5].tolist()}")
        return self._order[pos]

    def update(self, sample_ids: np.ndarray, logits, round_: int) -> None:
        """``logits``: len(sample_ids) x K (numpy, or anything ``np.asarray`` takes). Raises ValueError/KeyError."""
        logits = np.asarray(logits, dtype=np.float32)
        if logits.shape != (len(sample_ids), self.logits.shape[1]):
            raise ValueError(f"expected {len(sample_ids)} x {self.logits.shape[1]} logits, got {tuple(logits.shape)}")
        rows = self.rows(sample_ids)
        self.logits[rows] = logits
        self.present[rows] = True
        self.round = round_

    def lookup(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits B x K float32, present B bool) for the batch's ids."""
        rows = self.rows(sample_ids)
        return self.logits[rows], self.present[rows]

    def load(self, logits: np.ndarray, present: np.ndarray, round_: int) -> None:
        """Restore a saved store (shapes checked by the caller's state check)."""
        self.logits[...] = logits
        self.present[...] = present.astype(bool)
        self.round = round_

    def __len__(self) -> int:
        return int(self.present.sum())
