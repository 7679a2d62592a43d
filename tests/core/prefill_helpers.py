"""One batched prefill step through our model (shared by the families' logit tests)."""

from __future__ import annotations

import torch

from services.core.batch import build_batch_meta
from services.core.kv_cache import BlockManager
from services.core.model import MonolithicModel


def prefill_logits(model: MonolithicModel, prompts: list[list[int]], block_size: int = 4
                   ) -> torch.Tensor:
    """Every prompt prefilled in one step (mixed lengths): last-token logits [B, V]."""
    bm = BlockManager(64, block_size)
    kv = model.new_kv_cache(64, block_size)
    for i, p in enumerate(prompts):
        bm.allocate(i)
        bm.append_slots(i, len(p))
    meta = build_batch_meta([bm.block_table(i) for i in range(len(prompts))],
                            [0] * len(prompts), [len(p) for p in prompts], block_size)
    return model.forward(torch.tensor([t for p in prompts for t in p]), meta, kv)
