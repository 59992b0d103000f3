"""Paged KV-cache block allocator (reference of ``helixflow._native.BlockAllocator``).

The KV cache is ``num_blocks`` fixed-size blocks of ``block_size`` token slots. Each sequence
owns a block table (a list of block ids); blocks are reference-counted so forks and prefix-cache
hits share them.

Prefix caching: once every token of a block has been computed, the block is registered under a
chained hash of (parent block's hash, the block's token ids). A new sequence whose leading full
blocks hash the same takes those blocks instead of recomputing them. Every hit is verified
against the stored parent hash and token ids, so a hash collision can only cost a miss.

Free blocks come in two kinds. Blocks holding no cached content are handed out first, in FIFO
order (initially ``0, 1, 2, ...``). Free blocks that still hold cached content are reused last,
least-recently-used first; a sequence's blocks are freed tail first, so its tail is evicted
before its head. Taking such a block evicts its cache entry.

Failure kinds: a shortage of blocks is a return value (``None``); misuse (unknown or duplicate
sequence ids, double free, bad sizes) raises ``ValueError``.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

MASK64 = (1 << 64) - 1
ROOT_HASH = 0
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3


def hash_block_tokens(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Chained 64-bit hash of one block: FNV-1a over parent hash and 32-bit token ids, mixed."""
    h = ((_FNV_OFFSET ^ parent_hash) * _FNV_PRIME) & MASK64
    for t in token_ids:
        h = ((h ^ (t & 0xFFFFFFFF)) * _FNV_PRIME) & MASK64
    # NOTE: splitmix64's finaliser, so that every input bit reaches every output bit.
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & MASK64
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & MASK64
    return h ^ (h >> 31)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_token_ids(token_ids: Sequence[int]) -> None:
    if token_ids and not (min(token_ids) >= 0 and max(token_ids) <= 0x7FFFFFFF):
        raise ValueError("token_ids must hold token ids in [0, 2**31)")


class _Seq:
    """One sequence's block table and how far its prefix-cache chain has been registered."""

    __slots__ = ("blocks", "last_hash", "num_hashed_blocks")

    def __init__(self, blocks: list[int], num_hashed_blocks: int, last_hash: int) -> None:
        self.blocks = blocks
        self.num_hashed_blocks = num_hashed_blocks
        self.last_hash = last_hash


class BlockAllocator:
    """Reference-counted paged KV blocks with prefix caching and copy-on-write forks.

    Not thread-safe: one engine thread owns it.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._content: list[tuple[int, tuple[int, ...]] | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._free_uncached: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._seqs: dict[int, _Seq] = {}
        self._query_tokens = 0
        self._hit_tokens = 0

    # ---- sizes and stats -------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def enable_prefix_caching(self) -> bool:
        return self._enable_prefix_caching

    @property
    def num_free_blocks(self) -> int:
        """Blocks ``allocate``/``append_slots`` can take now (cached-but-free ones included)."""
        return len(self._free_uncached) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self._num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, in use or free."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self._num_blocks

    def stats(self) -> dict[str, float]:
        q, h = self._query_tokens, self._hit_tokens
        return {
            "num_blocks": self._num_blocks,
            "num_free_blocks": self.num_free_blocks,
            "num_used_blocks": self.num_used_blocks,
            "num_cached_blocks": self.num_cached_blocks,
            "num_evictable_blocks": len(self._evictable),
            "prefix_query_tokens": q,
            "prefix_hit_tokens": h,
            "prefix_hit_rate": h / q if q else 0.0,
        }

    # ---- inspection ------------------------------------------------------------------------
    def has_seq(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._seq(seq_id).blocks)

    def ref_count(self, block_id: int) -> int:
        self._check_block(block_id)
        return self._ref[block_id]

    def cached_block_hash(self, block_id: int) -> int | None:
        self._check_block(block_id)
        return self._hash[block_id]

    def free_block_ids(self) -> list[int]:
        """Free blocks in the order they will be handed out."""
        return [*self._free_uncached, *self._evictable]

    # ---- the operations --------------------------------------------------------------------
    def num_cached_prefix_tokens(self, token_ids: Sequence[int]) -> int:
        """Tokens a new sequence with these ids would take from the cache (no side effects).

        At most ``len(token_ids) - 1``, in whole blocks: the last token is always computed.
        """
        _check_token_ids(token_ids)
        return len(self._lookup(token_ids, len(token_ids))) * self._block_size

    def allocate(self, seq_id: int, token_ids: Sequence[int], num_tokens: int) -> int | None:
        """Give a new sequence a block table covering its first ``num_tokens`` tokens.

        Leading blocks come from the prefix cache (at most ``num_tokens - 1`` tokens' worth).
        Returns the number of tokens served from the cache, or ``None`` (nothing changed)
        when there are not enough free blocks.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already has blocks")
        _check_token_ids(token_ids)
        if not 1 <= num_tokens <= len(token_ids):
            raise ValueError(f"num_tokens must be in [1, {len(token_ids)}], got {num_tokens}")
        hits = self._lookup(token_ids, num_tokens)
        num_new = cdiv(num_tokens, self._block_size) - len(hits)
        num_revived = sum(1 for b in hits if self._ref[b] == 0)
        if num_new > self.num_free_blocks - num_revived:
            return None
        for b in hits:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        blocks = hits + [self._take_free_block() for _ in range(num_new)]
        last_hash = self._hash[hits[-1]] if hits else ROOT_HASH
        assert last_hash is not None
        self._seqs[seq_id] = _Seq(blocks, len(hits), last_hash)
        num_cached = len(hits) * self._block_size
        if self._enable_prefix_caching:
            self._query_tokens += len(token_ids)
            self._hit_tokens += num_cached
        return num_cached

    def append_slots(
        self, seq_id: int, num_computed_tokens: int, num_tokens: int
    ) -> list[tuple[int, int]] | None:
        """Grow a sequence's table to cover ``num_tokens`` tokens, ready for writes from
        ``num_computed_tokens`` on.

        A block that will be written but is shared (after a fork) is first replaced by a
        private copy. Returns the copies to make, ``(src_block, dst_block)``, before the step
        runs; or ``None`` (nothing changed) when there are not enough free blocks.
        """
        seq = self._seq(seq_id)
        capacity = len(seq.blocks) * self._block_size
        if not 0 <= num_computed_tokens < num_tokens or num_computed_tokens > capacity:
            raise ValueError(
                f"need 0 <= num_computed_tokens ({num_computed_tokens}) < num_tokens "
                f"({num_tokens}) and num_computed_tokens <= {capacity} slots held"
            )
        num_new = max(0, cdiv(num_tokens, self._block_size) - len(seq.blocks))
        first = num_computed_tokens // self._block_size
        shared = [i for i in range(first, len(seq.blocks)) if self._ref[seq.blocks[i]] > 1]
        if num_new + len(shared) > self.num_free_blocks:
            return None
        copies = []
        for i in shared:
            src = seq.blocks[i]
            dst = self._take_free_block()
            self._ref[src] -= 1
            seq.blocks[i] = dst
            copies.append((src, dst))
        seq.blocks.extend(self._take_free_block() for _ in range(num_new))
        return copies

    def cache_blocks(self, seq_id: int, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the sequence's blocks whose tokens are all computed in the prefix cache."""
        seq = self._seq(seq_id)
        _check_token_ids(token_ids)
        if not 0 <= num_computed_tokens <= len(token_ids):
            raise ValueError(
                f"num_computed_tokens must be in [0, {len(token_ids)}], got {num_computed_tokens}"
            )
        if not self._enable_prefix_caching:
            return
        bs = self._block_size
        num_full = min(num_computed_tokens // bs, len(seq.blocks))
        for i in range(seq.num_hashed_blocks, num_full):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = hash_block_tokens(seq.last_hash, tokens)
            b = seq.blocks[i]
            if self._hash[b] is None and h not in self._cached:
                self._cached[h] = b
                self._hash[b] = h
                self._content[b] = (seq.last_hash, tokens)
            seq.last_hash = h
            seq.num_hashed_blocks = i + 1

    def fork(self, parent_id: int, child_id: int) -> None:
        """Give ``child_id`` the parent's blocks, shared copy-on-write."""
        parent = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id} already has blocks")
        for b in parent.blocks:
            self._ref[b] += 1
        self._seqs[child_id] = _Seq(list(parent.blocks), parent.num_hashed_blocks, parent.last_hash)

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks (tail first); cached ones stay reusable until evicted."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise ValueError(f"unknown sequence {seq_id} (never allocated or already freed)")
        for b in reversed(seq.blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash[b] is None:
                    self._free_uncached.append(b)
                else:
                    self._evictable[b] = None

    # ---- internals -------------------------------------------------------------------------
    def _seq(self, seq_id: int) -> _Seq:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise ValueError(f"unknown sequence {seq_id}")
        return seq

    def _check_block(self, block_id: int) -> None:
        if not 0 <= block_id < self._num_blocks:
            raise IndexError(f"block id {block_id} out of range [0, {self._num_blocks})")

    def _lookup(self, token_ids: Sequence[int], num_tokens: int) -> list[int]:
        """Cached blocks matching the leading full blocks, covering at most num_tokens - 1."""
        if not self._enable_prefix_caching:
            return []
        bs = self._block_size
        hits: list[int] = []
        parent = ROOT_HASH
        for i in range(max(0, num_tokens - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = hash_block_tokens(parent, tokens)
            b = self._cached.get(h)
            if b is None or self._content[b] != (parent, tokens):
                break
            hits.append(b)
            parent = h
        return hits

    def _take_free_block(self) -> int:
        if self._free_uncached:
            b = self._free_uncached.popleft()
        else:
            b, _ = self._evictable.popitem(last=False)
            h = self._hash[b]
            assert h is not None
            del self._cached[h]
            self._hash[b] = None
            self._content[b] = None
        self._ref[b] = 1
        return b
