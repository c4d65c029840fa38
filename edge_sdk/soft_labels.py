"""Per-sample teacher logits keyed by sample id (never by batch position)."""
from __future__ import annotations

import numpy as np
import torch


class SoftLabelStore:
    """Dense logits for a fixed set of sample ids, with a mask of which ids have a teacher yet.

    ``update`` and ``lookup`` translate ids to rows with a sorted index, so a shuffled loader and
    a server that answers in any order still pair every logit with its own image.
    """

    def __init__(self, sample_ids: np.ndarray, num_classes: int):
        self._order = np.argsort(sample_ids, kind="stable")
        self._sorted = np.asarray(sample_ids)[self._order]
        if len(np.unique(self._sorted)) != len(self._sorted):
            raise ValueError("sample ids must be unique")
        self.logits = torch.zeros(len(sample_ids), num_classes)
        self.present = torch.zeros(len(sample_ids), dtype=torch.bool)
        self.round = -1

    def rows(self, sample_ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self._sorted, sample_ids)
        pos = np.minimum(pos, len(self._sorted) - 1)
        bad = self._sorted[pos] != sample_ids
        if bad.any():
            raise KeyError(f"sample ids not held by this store: {np.asarray(sample_ids)[bad][:5].tolist()}")
        return self._order[pos]

    def update(self, sample_ids: np.ndarray, logits: torch.Tensor, round_: int) -> None:
        if logits.shape != (len(sample_ids), self.logits.shape[1]):
            raise ValueError(f"expected {len(sample_ids)} x {self.logits.shape[1]} logits, got {tuple(logits.shape)}")
        rows = torch.from_numpy(self.rows(sample_ids))
        self.logits[rows] = logits.float()
        self.present[rows] = True
        self.round = round_

    def lookup(self, sample_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits B x K, present B bool) for the batch's ids."""
        rows = torch.from_numpy(self.rows(sample_ids))
        return self.logits[rows], self.present[rows]

    def __len__(self) -> int:
        return int(self.present.sum())
