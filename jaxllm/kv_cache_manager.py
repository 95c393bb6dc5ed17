"""KVCacheManager: the host-side block pool behind the paged KV cache (imports no jax).

Block 0 is never handed out: padded tokens write their K/V there and padded block-table entries
point at it, so device code never branches on a missing block. Every other block is in exactly
one of three states:
  free     ref count 0, no hash: on the free list, handed out first;
  cached   ref count 0, with a hash: in the LRU of evictable blocks (least recently freed
           first); a prefix hit takes it back, and allocation evicts from the front when the
           free list is empty;
  used     ref count > 0: held by that many sequences (prefix hits and forks share blocks).

Automatic prefix caching (as in vLLM v1). Once a block is full of computed tokens it is named
by a chained hash, ``sha256(parent hash | its token ids | repr(extra key))``, so the name fixes
every token before it and its position: two blocks with the same name hold the same K/V. The
extra key is the request's ``cache_salt`` (None by default), for anything else that changes
K/V. A sequence admitted later attaches the longest run of named blocks matching its own
leading full blocks instead of computing them again.

Why sha256 and not Python's ``hash()`` of a tuple (about 0.5 us instead of 2 us per 16-token
block here): a collision silently serves another prompt's K/V, and 64-bit tuple hashes of
integers can be collided on purpose by a client (vLLM's CVE-2025-25183). sha256 also names a
block the same way in every process, which a shared or offloaded cache will need.

Copy-on-write: ``fork`` shares all of a sequence's blocks. A sequence about to write into a
block someone else also holds gets a fresh block instead; when the old one already holds some of
its computed tokens, the pair (src, dst) is recorded for the device to copy before the step.
"""

from __future__ import annotations

import array
import collections
import hashlib

from jaxllm.sequence import Sequence

_ROOT_HASH = hashlib.sha256(b"jaxllm prefix cache root").digest()


def hash_block_tokens(parent_hash: bytes, token_ids: list[int], extra_key: object = None) -> bytes:
    """The chained name of one full block (the parent of a sequence's first block is a constant).

    Unambiguous because the parent is always 32 bytes and a full block always has
    ``block_size`` tokens of 8 bytes; the extra key's repr comes last.
    """
    payload = parent_hash + array.array("q", token_ids).tobytes() + repr(extra_key).encode()
    return hashlib.sha256(payload).digest()


class KVCacheManager:
    """Owns which KV blocks are free, cached or held, and by how many sequences."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (block 0 is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free_block_ids: collections.deque[int] = collections.deque(range(1, num_blocks))
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[bytes | None] = [None] * num_blocks
        self._block_id_by_hash: dict[bytes, int] = {}
        self._num_used_blocks = 0
        self._block_copies: list[tuple[int, int]] = []
        self.num_queried_tokens = 0  # tokens of every admitted sequence, prefix caching on
        self.num_hit_tokens = 0      # of those, tokens whose K/V came from the cache

    # ---- counters ----
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: the free list plus the evictable cached blocks."""
        return len(self._free_block_ids) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Evictable blocks: nobody holds them, but their hash keeps them reusable."""
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self._num_used_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> bytes | None:
        return self._block_hashes[block_id]

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- admission and growth ----
    def get_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached run of ``seq``'s leading full blocks.

        Never the whole sequence: at least its last token is left to compute, so the step that
        admits it produces logits. None at all while it still needs its prompt logprobs, which
        only computing every prompt token gives.
        """
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:
            return []
        self._update_block_hashes(seq)
        hashes = seq.block_hashes
        block_ids: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block_id = self._block_id_by_hash.get(hashes[i])
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def num_new_blocks_needed(self, seq: Sequence, num_new_tokens: int,
                              cached_block_ids: list[int] | None = None) -> int:
        """Fresh blocks ``allocate`` would take, copy-on-write replacements included.

        With ``cached_block_ids`` (an admission), ``num_new_tokens`` counts from the end of that
        prefix, whose blocks are attached rather than taken.
        """
        if cached_block_ids is None:
            start, num_held = seq.num_computed_tokens, len(seq.block_ids)
            num_copies = len(self._shared_write_indices(seq, num_new_tokens))
        else:
            num_held = len(cached_block_ids)
            start, num_copies = num_held * self.block_size, 0
        return max(0, self.num_blocks_for(start + num_new_tokens) - num_held) + num_copies

    def can_allocate(self, seq: Sequence, num_new_tokens: int,
                     cached_block_ids: list[int] | None = None) -> bool:
        return self._num_blocks_to_take(seq, num_new_tokens, cached_block_ids) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int,
                 cached_block_ids: list[int] | None = None) -> None:
        """Gives ``seq`` slots for its next ``num_new_tokens`` tokens; changes nothing on failure.

        Admitting a sequence (no blocks, nothing computed), pass ``get_cached_prefix(seq)`` as
        ``cached_block_ids``, even when empty: those blocks are attached, ``num_computed_tokens``
        jumps to their end, and the lookup counts in the hit statistics.
        """
        if cached_block_ids is not None:
            self._check_prefix(seq, cached_block_ids)
        needed = self._num_blocks_to_take(seq, num_new_tokens, cached_block_ids)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {needed}, have {self.num_free_blocks}")
        if cached_block_ids is not None:
            self._attach_prefix(seq, cached_block_ids)
        for index in self._shared_write_indices(seq, num_new_tokens):
            src, dst = seq.block_ids[index], self._take_block()
            self._release(src)  # still held by someone else
            seq.block_ids[index] = dst
            if index * self.block_size < seq.num_computed_tokens:
                self._block_copies.append((src, dst))
        num_blocks = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        while len(seq.block_ids) < num_blocks:
            seq.block_ids.append(self._take_block())

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Names every block of ``seq`` now full of computed tokens, making it reusable.

        Call after each step once ``num_computed_tokens`` is updated. A block whose name
        already belongs to another block stays unnamed (it returns to the free list when freed).
        """
        if not self.enable_prefix_caching:
            return
        # Not past its known tokens: a step in flight may compute proposals (speculative
        # decoding) behind the step whose outputs are being recorded.
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        self._update_block_hashes(seq)
        for i in range(seq.num_registered_blocks, num_full):
            block_id, block_hash = seq.block_ids[i], seq.block_hashes[i]
            if self._block_hashes[block_id] is None and block_hash not in self._block_id_by_hash:
                self._block_hashes[block_id] = block_hash
                self._block_id_by_hash[block_hash] = block_id
        seq.num_registered_blocks = num_full

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Makes ``child`` share ``parent``'s blocks of the computed tokens they have in common
        (copy-on-write): the first ``min(parent.num_computed_tokens, child.num_tokens)``, which
        must be equal.
        """
        if child.block_ids:
            raise ValueError(f"fork: child {child.request_id} already holds blocks")
        num_shared = min(parent.num_computed_tokens, child.num_tokens)
        if child.token_ids[:num_shared] != parent.token_ids[:num_shared]:
            raise ValueError("fork: the child's tokens differ from the parent's computed tokens")
        shared = parent.block_ids[:self.num_blocks_for(num_shared)]
        for block_id in shared:
            self._ref_counts[block_id] += 1
        child.block_ids.extend(shared)
        child.num_computed_tokens = num_shared
        child.num_registered_blocks = min(parent.num_registered_blocks, num_shared // self.block_size)
        child.block_hashes = parent.block_hashes[:num_shared // self.block_size]

    def take_block_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) block copies recorded since the last call, in order."""
        copies, self._block_copies = self._block_copies, []
        return copies

    def free(self, seq: Sequence) -> None:
        """Drops ``seq``'s blocks, tail first: of a cached prefix, the tail is evicted first."""
        for block_id in reversed(seq.block_ids):
            self._release(block_id)
        seq.block_ids.clear()
        seq.num_registered_blocks = 0

    def free_tail(self, seq: Sequence) -> None:
        """Drops ``seq``'s blocks past its computed tokens (after a speculative rollback)."""
        keep = self.num_blocks_for(seq.num_computed_tokens)
        while len(seq.block_ids) > keep:
            self._release(seq.block_ids.pop())

    def reset_prefix_cache(self) -> None:
        """Forgets every block name; the evictable blocks become plain free blocks."""
        for block_id in self._block_id_by_hash.values():
            self._block_hashes[block_id] = None
        self._block_id_by_hash.clear()
        self._free_block_ids.extend(self._evictable)
        self._evictable.clear()

    # ---- internals ----
    def _num_blocks_to_take(self, seq: Sequence, num_new_tokens: int,
                            cached_block_ids: list[int] | None) -> int:
        """New blocks plus the evictable blocks of the prefix hit, which leave the pool too."""
        needed = self.num_new_blocks_needed(seq, num_new_tokens, cached_block_ids)
        if cached_block_ids:
            needed += sum(1 for block_id in cached_block_ids if self._ref_counts[block_id] == 0)
        return needed

    def _shared_write_indices(self, seq: Sequence, num_new_tokens: int) -> list[int]:
        """Indices of held blocks that the next tokens write into and someone else also holds."""
        if num_new_tokens <= 0:
            return []
        start = seq.num_computed_tokens
        end = min(len(seq.block_ids), self.num_blocks_for(start + num_new_tokens))
        return [i for i in range(start // self.block_size, end)
                if self._ref_counts[seq.block_ids[i]] > 1]

    def _check_prefix(self, seq: Sequence, block_ids: list[int]) -> None:
        if seq.block_ids or seq.num_computed_tokens:
            raise ValueError(f"{seq.request_id}: a prefix attaches only to a sequence with no blocks")
        if not block_ids:
            return
        if len(block_ids) * self.block_size >= seq.num_tokens:
            raise ValueError(f"{seq.request_id}: a prefix hit must leave a token to compute")
        self._update_block_hashes(seq)
        for i, block_id in enumerate(block_ids):
            if i >= len(seq.block_hashes) or self._block_hashes[block_id] != seq.block_hashes[i]:
                raise ValueError(f"{seq.request_id}: block {block_id} is not its cached block {i}")

    def _attach_prefix(self, seq: Sequence, block_ids: list[int]) -> None:
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
                self._num_used_blocks += 1
            self._ref_counts[block_id] += 1
        seq.block_ids.extend(block_ids)
        seq.num_computed_tokens = len(block_ids) * self.block_size
        seq.num_registered_blocks = len(block_ids)
        if self.enable_prefix_caching:
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += seq.num_computed_tokens

    def _take_block(self) -> int:
        if self._free_block_ids:
            block_id = self._free_block_ids.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            del self._block_id_by_hash[self._block_hashes[block_id]]
            self._block_hashes[block_id] = None
        self._ref_counts[block_id] = 1
        self._num_used_blocks += 1
        return block_id

    def _release(self, block_id: int) -> None:
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id]:
            return
        self._num_used_blocks -= 1
        if self._block_hashes[block_id] is not None:
            self._evictable[block_id] = None
        else:
            self._free_block_ids.append(block_id)
        if self._block_copies:  # a copy into a block given up before the step is moot
            self._block_copies = [c for c in self._block_copies if c[1] != block_id]

    def _update_block_hashes(self, seq: Sequence) -> None:
        """Extends ``seq.block_hashes`` to all full blocks of its tokens (tokens only grow)."""
        hashes, bs = seq.block_hashes, self.block_size
        extra_key = seq.request.prefix_cache_key
        for i in range(len(hashes), seq.num_tokens // bs):
            parent = hashes[i - 1] if i else _ROOT_HASH
            hashes.append(hash_block_tokens(parent, seq.token_ids[i * bs:(i + 1) * bs], extra_key))
