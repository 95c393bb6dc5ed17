"""KVCacheManager: the host-side block pool behind the paged KV cache (imports no jax).

Block 0 is never handed out: padded tokens write their K/V there and padded block-table entries
point at it, so device code never branches on a missing block.
"""

from __future__ import annotations

import collections

from jaxllm.sequence import Sequence


class KVCacheManager:
    """Owns which KV blocks are free and which sequence holds which blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_block_ids: collections.deque[int] = collections.deque(range(1, num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_ids))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Extends ``seq.block_ids`` so its next ``num_new_tokens`` tokens have slots."""
        needed = self.num_new_blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {needed}, have {self.num_free_blocks}")
        for _ in range(needed):
            block_id = self._free_block_ids.popleft()
            self._ref_counts[block_id] = 1
            seq.block_ids.append(block_id)

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_ids):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free_block_ids.append(block_id)
        seq.block_ids.clear()

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]
