// Paged KV-cache block allocator: reference-counted fixed-size blocks, prefix caching by a
// chained hash of full blocks (verified on every hit), LRU eviction of free cached blocks and
// copy-on-write forks. Mirrors helixflow/pool/reference/block_allocator.py exactly.
//
// Failure kinds: a shortage of blocks is a return value (std::nullopt / false); misuse (unknown
// or duplicate ids, bad sizes) throws std::invalid_argument (ValueError in Python); bad block
// ids throw std::out_of_range (IndexError). Not thread-safe: one engine thread owns it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

namespace helixflow {

using BlockId = int32_t;
using SeqId = int64_t;
using TokenId = int32_t;
using BlockCopy = std::pair<BlockId, BlockId>;  // (src, dst)

inline constexpr uint64_t kRootHash = 0;
inline constexpr BlockId kNoBlock = -1;  // end of the intrusive LRU list

// Chained 64-bit hash of one block: FNV-1a over the parent hash and 32-bit token ids, then
// splitmix64's finaliser. Same values as the Python reference's hash_block_tokens.
uint64_t hash_block_tokens(uint64_t parent_hash, const TokenId* tokens, size_t num_tokens);

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One sequence's block table and how far its prefix-cache chain has been registered.
struct SeqBlocks {
  std::vector<BlockId> blocks;
  int64_t num_hashed_blocks = 0;
  uint64_t last_hash = kRootHash;
};

struct AllocatorStats {
  int64_t num_blocks;
  int64_t num_free_blocks;
  int64_t num_used_blocks;
  int64_t num_cached_blocks;
  int64_t num_evictable_blocks;
  int64_t prefix_query_tokens;
  int64_t prefix_hit_tokens;
  double prefix_hit_rate;
};

// Prefix-cache index: block hash -> block id. Open addressing with linear probing over a
// power-of-two table of at least twice the blocks, backward-shift deletion: no allocation after
// construction (a std::unordered_map node per registered block cost ~75 % of a prefill step).
class BlockHashTable {
 public:
  explicit BlockHashTable(int64_t max_entries);
  BlockId find(uint64_t hash) const;      // kNoBlock when absent
  bool insert(uint64_t hash, BlockId b);  // false (unchanged) when the hash is present
  void erase(uint64_t hash);              // the hash must be present
  int64_t size() const { return size_; }

 private:
  size_t slot(uint64_t hash) const { return static_cast<size_t>(hash) & mask_; }
  std::vector<uint64_t> keys_;
  std::vector<BlockId> values_;  // kNoBlock marks an empty slot
  size_t mask_ = 0;
  int64_t size_ = 0;
};

class BlockAllocator {
 public:
  BlockAllocator(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching = true);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  bool enable_prefix_caching() const { return enable_prefix_caching_; }
  int64_t num_free_blocks() const { return free_size_ + evictable_size_; }
  int64_t num_used_blocks() const { return num_blocks_ - num_free_blocks(); }
  int64_t num_cached_blocks() const { return cached_.size(); }
  double usage() const { return static_cast<double>(num_used_blocks()) / num_blocks_; }
  AllocatorStats stats() const;

  bool has_seq(SeqId seq_id) const { return seqs_.count(seq_id) != 0; }
  const std::vector<BlockId>& block_table(SeqId seq_id) const;
  int32_t ref_count(BlockId block_id) const;
  std::optional<uint64_t> cached_block_hash(BlockId block_id) const;
  std::vector<BlockId> free_block_ids() const;

  // Tokens a new sequence with these ids would take from the cache (no side effects).
  int64_t num_cached_prefix_tokens(const TokenId* tokens, size_t num_tokens) const;
  // New sequence covering its first num_tokens tokens; returns the cached prefix length.
  std::optional<int64_t> allocate(SeqId seq_id, const TokenId* tokens, size_t size,
                                  int64_t num_tokens);
  // Grow a table to num_tokens, copy-on-write for shared blocks from num_computed_tokens on.
  // Appends the copies to `copies`; false (nothing changed) on shortage.
  bool append_slots(SeqId seq_id, int64_t num_computed_tokens, int64_t num_tokens,
                    std::vector<BlockCopy>& copies);
  // Register the blocks whose tokens are all computed in the prefix cache.
  void cache_blocks(SeqId seq_id, const TokenId* tokens, size_t size, int64_t num_computed_tokens);
  void fork(SeqId parent_id, SeqId child_id);
  void free(SeqId seq_id);


 private:
  bool append_slots(SeqBlocks& seq, int64_t num_computed_tokens, int64_t num_tokens,
                    std::vector<BlockCopy>& copies);
  void cache_blocks(SeqBlocks& seq, const TokenId* tokens, size_t size,
                    int64_t num_computed_tokens);
  SeqBlocks& seq(SeqId seq_id);
  const SeqBlocks& seq(SeqId seq_id) const;
  void check_block(BlockId block_id) const;
  // Cached blocks matching the leading full blocks, covering at most num_tokens - 1 tokens.
  void lookup(const TokenId* tokens, int64_t num_tokens, std::vector<BlockId>& hits) const;
  BlockId take_free_block();
  void push_free_uncached(BlockId b);
  void lru_push_back(BlockId b);
  void lru_remove(BlockId b);

  int64_t num_blocks_;
  int64_t block_size_;
  bool enable_prefix_caching_;
  std::vector<int32_t> ref_;
  std::vector<uint8_t> has_hash_;
  std::vector<uint64_t> hash_;
  std::vector<uint64_t> parent_hash_;
  std::vector<TokenId> content_;  // num_blocks x block_size token ids of cached blocks
  BlockHashTable cached_;
  // Uncached free blocks: FIFO ring buffer.
  std::vector<BlockId> free_ring_;
  int64_t free_head_ = 0;
  int64_t free_size_ = 0;
  // Free cached blocks: intrusive LRU list (head = least recent).
  std::vector<BlockId> lru_prev_;
  std::vector<BlockId> lru_next_;
  BlockId lru_head_ = kNoBlock;
  BlockId lru_tail_ = kNoBlock;
  int64_t evictable_size_ = 0;
  std::unordered_map<SeqId, SeqBlocks> seqs_;
  int64_t query_tokens_ = 0;
  int64_t hit_tokens_ = 0;
  mutable std::vector<BlockId> scratch_hits_;
};

}  // namespace helixflow
