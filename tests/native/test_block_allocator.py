"""BlockAllocator: free-list order, prefix caching, LRU eviction, forks and copy-on-write."""

from __future__ import annotations

import pytest

BS = 4
A = list(range(100, 116))  # 16 token ids: 4 full blocks
B = list(range(200, 216))
C = list(range(300, 316))

STATS_KEYS = {
    "num_blocks",
    "num_free_blocks",
    "num_used_blocks",
    "num_cached_blocks",
    "num_evictable_blocks",
    "prefix_query_tokens",
    "prefix_hit_tokens",
    "prefix_hit_rate",
}


def test_new_allocator_is_empty_with_free_blocks_in_id_order(core) -> None:
    alloc = core.BlockAllocator(5, BS)
    assert (alloc.num_blocks, alloc.block_size, alloc.enable_prefix_caching) == (5, BS, True)
    assert alloc.free_block_ids() == [0, 1, 2, 3, 4]
    assert (alloc.num_free_blocks, alloc.num_used_blocks, alloc.num_cached_blocks) == (5, 0, 0)
    assert alloc.usage == 0.0
    assert [alloc.ref_count(b) for b in range(5)] == [0] * 5
    assert [alloc.cached_block_hash(b) for b in range(5)] == [None] * 5


def test_allocate_takes_free_blocks_in_order(core) -> None:
    alloc = core.BlockAllocator(8, BS)
    assert alloc.allocate(1, A[:10], 10) == 0
    assert alloc.allocate(2, B[:5], 5) == 0
    assert alloc.block_table(1) == [0, 1, 2]
    assert alloc.block_table(2) == [3, 4]
    assert alloc.free_block_ids() == [5, 6, 7]
    assert (alloc.num_free_blocks, alloc.num_used_blocks, alloc.usage) == (3, 5, 5 / 8)
    assert alloc.has_seq(1) and not alloc.has_seq(3)


def test_allocate_covers_only_num_tokens(core) -> None:
    """A partial allocation (chunked prefill) takes cdiv(num_tokens, block_size) blocks."""
    alloc = core.BlockAllocator(8, BS)
    assert alloc.allocate(1, A[:10], 5) == 0
    assert alloc.block_table(1) == [0, 1]


def test_uncached_blocks_are_reused_fifo_tail_first(core) -> None:
    alloc = core.BlockAllocator(6, BS)
    alloc.allocate(1, A[:8], 8)  # [0, 1]
    alloc.allocate(2, B[:8], 8)  # [2, 3]
    alloc.free(1)
    alloc.free(2)
    assert alloc.free_block_ids() == [4, 5, 1, 0, 3, 2]
    alloc.allocate(3, C[:16], 16)
    assert alloc.block_table(3) == [4, 5, 1, 0]
    assert alloc.free_block_ids() == [3, 2]


def test_cache_blocks_registers_only_fully_computed_blocks(core) -> None:
    alloc = core.BlockAllocator(8, BS)
    alloc.allocate(1, A[:10], 10)
    alloc.cache_blocks(1, A[:10], 7)
    h0 = core.hash_block_tokens(core.ROOT_HASH, A[0:4])
    assert alloc.cached_block_hash(0) == h0
    assert alloc.cached_block_hash(1) is None
    assert alloc.num_cached_blocks == 1
    alloc.cache_blocks(1, A[:10], 10)
    assert alloc.cached_block_hash(1) == core.hash_block_tokens(h0, A[4:8])
    assert alloc.cached_block_hash(2) is None  # 2 of its 4 tokens only
    assert alloc.num_cached_blocks == 2


def test_same_prefix_shares_cached_blocks(core) -> None:
    alloc = core.BlockAllocator(8, BS)
    alloc.allocate(1, A[:10], 10)
    alloc.cache_blocks(1, A[:10], 10)
    assert alloc.num_cached_prefix_tokens(A[:10]) == 8
    assert alloc.allocate(2, A[:10], 10) == 8
    assert alloc.block_table(1) == [0, 1, 2]
    assert alloc.block_table(2) == [0, 1, 3]
    assert [alloc.ref_count(b) for b in range(4)] == [2, 2, 1, 1]


def test_prefix_hit_stops_at_first_differing_block(core) -> None:
    alloc = core.BlockAllocator(8, BS)
    alloc.allocate(1, A[:12], 12)
    alloc.cache_blocks(1, A[:12], 12)
    other = A[:4] + B[4:12]
    assert alloc.num_cached_prefix_tokens(other) == 4
    assert alloc.allocate(2, other, 12) == 4
    assert alloc.block_table(2) == [0, 3, 4]


def test_prefix_hit_depends_on_parent_block(core) -> None:
    """Block 2 of A is cached, but not under another first block: the hash is chained."""
    alloc = core.BlockAllocator(8, BS)
    alloc.allocate(1, A[:12], 12)
    alloc.cache_blocks(1, A[:12], 12)
    assert alloc.num_cached_prefix_tokens(B[:4] + A[4:12]) == 0


def test_prefix_hit_is_capped_below_the_last_token(core) -> None:
    """At most len - 1 tokens, in whole blocks, come from the cache: the last is computed."""
    alloc = core.BlockAllocator(8, BS)
    alloc.allocate(1, A[:8], 8)
    alloc.cache_blocks(1, A[:8], 8)
    assert alloc.num_cached_blocks == 2
    assert alloc.num_cached_prefix_tokens(A[:8]) == 4
    assert alloc.num_cached_prefix_tokens(A[:9]) == 8
    assert alloc.num_cached_prefix_tokens(A[:1]) == 0
    assert alloc.allocate(2, A[:8], 8) == 4
    assert alloc.block_table(2) == [0, 2]
    assert [alloc.ref_count(b) for b in range(3)] == [2, 1, 1]


def test_num_cached_prefix_tokens_has_no_side_effects(core) -> None:
    alloc = core.BlockAllocator(8, BS)
    alloc.allocate(1, A[:10], 10)
    alloc.cache_blocks(1, A[:10], 10)
    alloc.free(1)
    before = (alloc.stats(), alloc.free_block_ids())
    assert alloc.num_cached_prefix_tokens(A[:10]) == 8
    assert (alloc.stats(), alloc.free_block_ids()) == before


def test_free_puts_cached_blocks_in_lru_list_tail_first(core) -> None:
    alloc = core.BlockAllocator(6, BS)
    alloc.allocate(1, A[:12], 12)
    alloc.cache_blocks(1, A[:12], 12)
    alloc.free(1)
    assert alloc.free_block_ids() == [3, 4, 5, 2, 1, 0]
    assert alloc.num_free_blocks == 6
    assert alloc.num_cached_blocks == 3
    assert alloc.stats()["num_evictable_blocks"] == 3
    assert [alloc.ref_count(b) for b in range(3)] == [0, 0, 0]


def test_allocation_takes_uncached_blocks_before_evicting_lru_first(core) -> None:
    alloc = core.BlockAllocator(6, BS)
    alloc.allocate(1, A[:12], 12)
    alloc.cache_blocks(1, A[:12], 12)
    alloc.free(1)  # free: [3, 4, 5] uncached, then [2, 1, 0] least recently used first
    assert alloc.allocate(2, B[:16], 16) == 0
    assert alloc.block_table(2) == [3, 4, 5, 2]
    assert alloc.cached_block_hash(2) is None
    assert alloc.num_cached_blocks == 2
    assert alloc.num_cached_prefix_tokens(A[:13]) == 8
    assert alloc.allocate(3, C[:4], 4) == 0
    assert alloc.block_table(3) == [1]
    assert alloc.cached_block_hash(1) is None
    assert alloc.num_cached_blocks == 1
    assert alloc.num_cached_prefix_tokens(A[:13]) == 4
    assert alloc.free_block_ids() == [0]


def test_earlier_freed_sequence_is_evicted_first(core) -> None:
    alloc = core.BlockAllocator(3, BS)
    for sid, toks in ((1, A[:4]), (2, B[:4]), (3, C[:4])):
        alloc.allocate(sid, toks, 4)
        alloc.cache_blocks(sid, toks, 4)
    alloc.free(2)
    alloc.free(3)
    alloc.free(1)
    assert alloc.free_block_ids() == [1, 2, 0]
    alloc.allocate(4, list(range(400, 404)), 4)
    assert alloc.block_table(4) == [1]
    assert alloc.num_cached_prefix_tokens(B[:5]) == 0
    assert alloc.num_cached_prefix_tokens(C[:5]) == 4


def test_prefix_hit_revives_a_free_cached_block(core) -> None:
    alloc = core.BlockAllocator(4, BS)
    alloc.allocate(1, A[:9], 9)
    alloc.cache_blocks(1, A[:9], 9)
    alloc.free(1)
    assert alloc.free_block_ids() == [3, 2, 1, 0]
    assert alloc.allocate(2, A[:9], 9) == 8
    assert alloc.block_table(2) == [0, 1, 3]
    assert alloc.free_block_ids() == [2]
    assert [alloc.ref_count(b) for b in range(4)] == [1, 1, 0, 1]
    assert alloc.stats()["num_evictable_blocks"] == 0
    assert alloc.num_cached_blocks == 2


def test_revived_blocks_do_not_count_as_free_for_the_new_ones(core) -> None:
    alloc = core.BlockAllocator(3, BS)
    alloc.allocate(1, A[:9], 9)
    alloc.cache_blocks(1, A[:9], 9)
    alloc.free(1)
    alloc.allocate(2, B[:4], 4)  # takes block 2, the only uncached one
    assert alloc.allocate(3, A[:9], 9) is None  # 2 hits to revive + 1 new > 2 free
    assert alloc.allocate(3, A[:8], 8) == 4  # 1 hit + 1 new fits
    assert alloc.block_table(3) == [0, 1]
    assert alloc.cached_block_hash(1) is None  # evicted to be the new block


def test_fork_shares_every_block(core) -> None:
    alloc = core.BlockAllocator(8, BS)
    alloc.allocate(1, A[:6], 6)
    alloc.fork(1, 2)
    assert alloc.block_table(2) == [0, 1]
    assert [alloc.ref_count(b) for b in range(3)] == [2, 2, 0]
    assert alloc.num_free_blocks == 6


def test_append_slots_copies_a_shared_partial_block_once(core) -> None:
    alloc = core.BlockAllocator(8, BS)
    alloc.allocate(1, A[:6], 6)
    alloc.fork(1, 2)
    assert alloc.append_slots(1, 6, 7) == [(1, 2)]
    assert alloc.block_table(1) == [0, 2]
    assert [alloc.ref_count(b) for b in range(3)] == [2, 1, 1]
    assert alloc.append_slots(2, 6, 7) == []
    assert alloc.block_table(2) == [0, 1]


def test_append_slots_copies_nothing_for_shared_full_blocks(core) -> None:
    """Writes start in a new block: the shared full blocks stay shared."""
    alloc = core.BlockAllocator(8, BS)
    alloc.allocate(1, A[:8], 8)
    alloc.fork(1, 2)
    assert alloc.append_slots(1, 8, 9) == []
    assert alloc.block_table(1) == [0, 1, 2]
    assert [alloc.ref_count(b) for b in range(3)] == [2, 2, 1]


def test_append_slots_grows_the_table(core) -> None:
    alloc = core.BlockAllocator(8, BS)
    alloc.allocate(1, A[:4], 4)
    assert alloc.append_slots(1, 3, 4) == []
    assert alloc.block_table(1) == [0]
    assert alloc.append_slots(1, 4, 13) == []
    assert alloc.block_table(1) == [0, 1, 2, 3]


def test_allocate_shortage_returns_none_and_changes_nothing(core) -> None:
    alloc = core.BlockAllocator(4, BS)
    alloc.allocate(1, A[:10], 10)
    alloc.cache_blocks(1, A[:10], 10)
    before = (alloc.free_block_ids(), alloc.stats())
    assert alloc.allocate(2, B[:8], 8) is None
    assert (alloc.free_block_ids(), alloc.stats()) == before
    assert not alloc.has_seq(2)
    assert alloc.allocate(2, B[:4], 4) == 0  # still usable


def test_append_slots_shortage_returns_none_and_changes_nothing(core) -> None:
    alloc = core.BlockAllocator(4, BS)
    alloc.allocate(1, A[:6], 6)
    alloc.fork(1, 2)
    alloc.allocate(3, B[:4], 4)
    before = (alloc.free_block_ids(), alloc.stats(), [alloc.ref_count(b) for b in range(4)])
    assert alloc.append_slots(1, 6, 9) is None  # 1 copy + 1 new block > 1 free
    after = (alloc.free_block_ids(), alloc.stats(), [alloc.ref_count(b) for b in range(4)])
    assert after == before
    assert alloc.block_table(1) == [0, 1]
    assert alloc.append_slots(1, 6, 8) == [(1, 3)]


def test_stats_keys_and_prefix_hit_rate(core) -> None:
    alloc = core.BlockAllocator(8, BS)
    assert set(alloc.stats()) == STATS_KEYS
    assert alloc.stats()["prefix_hit_rate"] == 0.0
    alloc.allocate(1, A[:10], 10)
    alloc.cache_blocks(1, A[:10], 10)
    alloc.allocate(2, A[:10], 10)
    assert alloc.stats() == {
        "num_blocks": 8,
        "num_free_blocks": 4,
        "num_used_blocks": 4,
        "num_cached_blocks": 2,
        "num_evictable_blocks": 0,
        "prefix_query_tokens": 20,
        "prefix_hit_tokens": 8,
        "prefix_hit_rate": 0.4,
    }
    assert alloc.usage == 0.5


def test_disabled_prefix_caching_never_caches(core) -> None:
    alloc = core.BlockAllocator(8, BS, enable_prefix_caching=False)
    assert alloc.enable_prefix_caching is False
    alloc.allocate(1, A[:10], 10)
    alloc.cache_blocks(1, A[:10], 10)
    assert alloc.num_cached_blocks == 0
    assert [alloc.cached_block_hash(b) for b in range(3)] == [None] * 3
    assert alloc.num_cached_prefix_tokens(A[:10]) == 0
    assert alloc.allocate(2, A[:10], 10) == 0
    assert alloc.block_table(2) == [3, 4, 5]
    alloc.free(1)
    assert alloc.free_block_ids() == [6, 7, 2, 1, 0]
    stats = alloc.stats()
    assert (stats["prefix_query_tokens"], stats["prefix_hit_tokens"]) == (0, 0)
    assert stats["num_evictable_blocks"] == 0


@pytest.mark.parametrize(
    ("parent", "tokens", "expected"),
    [
        (0, [1, 2, 3], 13888429996271860896),
        (5, [1, 2, 3], 13436682088184283407),
        (0, [], 2737183428366584608),
    ],
)
def test_hash_block_tokens_values(core, parent: int, tokens: list[int], expected: int) -> None:
    """Pinned values: both implementations hash alike (they share a prefix cache format)."""
    assert core.ROOT_HASH == 0
    assert core.hash_block_tokens(parent, tokens) == expected


def test_hash_block_tokens_is_chained_and_order_sensitive(core) -> None:
    h = core.hash_block_tokens
    root = h(core.ROOT_HASH, A[:4])
    assert h(root, A[4:8]) != h(core.ROOT_HASH, A[4:8])
    assert h(root, A[4:8]) == h(root, A[4:8])
    assert h(core.ROOT_HASH, [1, 2]) != h(core.ROOT_HASH, [2, 1])
    assert 0 <= h(2**64 - 1, [2**31 - 1]) < 2**64


def test_hash_block_tokens_matches_the_reference(core) -> None:
    from helixflow.pool import reference

    for parent in (0, 1, 2**63, 2**64 - 1):
        for tokens in ([0], A[:4], [2**31 - 1, 0, 7], list(range(64))):
            assert core.hash_block_tokens(parent, tokens) == reference.hash_block_tokens(
                parent, tokens
            )
