"""Padding-free batches of built rows, with the teacher top-k of every target token.

A batch is one flat sequence: the packed rows of the micro-batch are concatenated (as
TRL's ``padding_free`` and :class:`transformers.DataCollatorWithFlattening` do) and
``position_ids`` restart at 0 at each document. The documents stay isolated from each other:
with ``flash_attention_2`` transformers turns these position ids into varlen cumulative lengths
(no padding token is computed); with ``sdpa``/``eager`` the trainer runs the documents as
right-padded groups (:func:`llmdistill.teacher.predicting_hidden`), each paying attention over
its own length only. A student sharded by FSDP or ZeRO-3 with ``sdpa``/``eager`` runs the packed
sequence under a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``):
(tokens x tokens), gigabytes for 32k-token rows.

The collator decodes the top-k, so it runs where the rows are fetched: in the DataLoader's
workers with ``dataloader_num_workers >= 1`` (it is a small picklable dataclass; each worker maps
the data files itself), ahead of the training step.

Targets: the token at flat position ``t`` is a target when its ``loss_mask`` is 1; the hidden
state at ``t - 1`` predicts it. A target at a document's first position has no predictor in
its document and is dropped (the builder never writes one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmdistill.codec import decode_topk


@dataclass
class DistillCollator:
    """Collate built rows (dicts of the built-shard columns) into one padding-free batch.

    Args:
        k: top-k entries per target token (shard metadata ``k``).
        vocab_size: vocabulary size the top-k ids index (metadata ``vocab_size``).
        codec_bits: bits per quantised log-prob gap (metadata ``codec_bits``).
        with_topk: decode the teacher top-k (False for plain SFT or shards built without it).

    Returns (from ``__call__``), all tensors:
        input_ids (1, L) int64 and position_ids (1, L) int64: the flattened rows;
        target_index (N,) int64: flat positions of the target tokens;
        teacher_ids (N, k) int64 and teacher_logprobs (N, k) float32 (only when ``with_topk``);
        num_rows () int64: packed rows in the batch (for the real-token fraction).
    """

    k: int
    vocab_size: int
    codec_bits: int
    with_topk: bool

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = np.concatenate([np.asarray(r["input_ids"], dtype=np.int64) for r in rows])
        position_ids = np.concatenate([np.asarray(r["position_ids"], dtype=np.int64) for r in rows])
        loss_mask = np.concatenate([np.asarray(r["loss_mask"], dtype=bool) for r in rows])
        # a target needs a predictor before it in its own document
        keep = position_ids[loss_mask] > 0
        batch = {
            "input_ids": torch.from_numpy(input_ids)[None],
            "position_ids": torch.from_numpy(position_ids)[None],
            "target_index": torch.from_numpy(np.flatnonzero(loss_mask)[keep]),
            "num_rows": torch.tensor(len(rows)),
        }
        if self.with_topk:
            ids, logprobs = self._decode(rows)
            batch["teacher_ids"] = torch.from_numpy(ids[keep])
            batch["teacher_logprobs"] = torch.from_numpy(logprobs[keep])
        return batch

    def _decode(self, rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """The top-k of every target of every row, in flat order: (sum n_i, k) ids and log-probs."""
        ids, logprobs = [], []
        for r in rows:
            n = int(np.count_nonzero(r["loss_mask"]))
            if r.get("topk") is None:
                raise ValueError(
                    f"a built row (documents {list(r.get('doc_ids') or [])[:3]}) has no teacher top-k: "
                    "rebuild the data with kd: true, or train with alpha: 0"
                )
            row_ids, row_lp = decode_topk(r["topk"], n, self.k, self.vocab_size, self.codec_bits)
            ids.append(row_ids)
            logprobs.append(row_lp)
        return np.concatenate(ids), np.concatenate(logprobs)
