"""The momentum feature queue of ALBEF/BLIP ITC (image / text features and image ids of earlier batches)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gather import concat_all_gather


class FeatureQueue(nn.Module):
    """Image / text feature queues ``[D, K]``, an image-id queue ``[1, K]`` and a write pointer.

    :meth:`enqueue` gathers the features of all ranks (rank order) and writes them at the pointer. A write that
    runs past the end continues at the start (wrap-around), so K need not be a multiple of the world batch
    (LAVIS/BLIP assert it is); a world batch larger than K keeps its last K entries. All index arithmetic
    stays on the device (no host synchronisation). Feature queues start as random unit vectors (as BLIP/ALBEF),
    the id queue as -100 (never an id of real data, so it matches nothing).
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.size = size
        self.register_buffer("image_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, image_ids: Tensor | None = None) -> None:
        """image_feat, text_feat: [B, D] (normalised, local); image_ids: [B] (None: -100). The world batch
        [world * B, D] is written, so every rank keeps the same queue (BLIP's ``concat_all_gather``)."""
        if image_ids is None:
            image_ids = torch.full((image_feat.shape[0],), -100, dtype=torch.long, device=image_feat.device)
        image_feat, text_feat, image_ids = (concat_all_gather(t) for t in (image_feat, text_feat, image_ids))
        n = image_feat.shape[0]
        if n > self.size:
            image_feat, text_feat, image_ids = image_feat[-self.size:], text_feat[-self.size:], image_ids[-self.size:]
            self.queue_ptr.add_(n - self.size)
            n = self.size
        index = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % self.size
        self.image_queue.index_copy_(1, index, image_feat.T.to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, index, text_feat.T.to(self.text_queue.dtype))
        self.idx_queue.index_copy_(1, index, image_ids.view(1, -1).to(self.idx_queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.size)
