#include "helixflow/block_allocator.h"

#include <algorithm>
#include <cassert>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

namespace helixflow {

namespace {
constexpr uint64_t kFnvOffset = 0xCBF29CE484222325ULL;
constexpr uint64_t kFnvPrime = 0x100000001B3ULL;

// Checked before any member is sized by it.
int64_t checked_num_blocks(int64_t num_blocks) {
  if (num_blocks < 1 || num_blocks > INT32_MAX) {
    throw std::invalid_argument("num_blocks must be in [1, 2**31), got " +
                                std::to_string(num_blocks));
  }
  return num_blocks;
}
}  // namespace

uint64_t hash_block_tokens(uint64_t parent_hash, const TokenId* tokens, size_t num_tokens) {
  uint64_t h = (kFnvOffset ^ parent_hash) * kFnvPrime;
  for (size_t i = 0; i < num_tokens; ++i) {
    h = (h ^ static_cast<uint32_t>(tokens[i])) * kFnvPrime;
  }
  h ^= h >> 30;
  h *= 0xBF58476D1CE4E5B9ULL;
  h ^= h >> 27;
  h *= 0x94D049BB133111EBULL;
  return h ^ (h >> 31);
}

BlockHashTable::BlockHashTable(int64_t max_entries) {
  size_t capacity = 16;
  while (capacity < 2 * static_cast<size_t>(max_entries)) capacity *= 2;
  keys_.assign(capacity, 0);
  values_.assign(capacity, kNoBlock);
  mask_ = capacity - 1;
}

BlockId BlockHashTable::find(uint64_t hash) const {
  for (size_t i = slot(hash);; i = (i + 1) & mask_) {
    if (values_[i] == kNoBlock) return kNoBlock;
    if (keys_[i] == hash) return values_[i];
  }
}

bool BlockHashTable::insert(uint64_t hash, BlockId b) {
  size_t i = slot(hash);
  for (; values_[i] != kNoBlock; i = (i + 1) & mask_) {
    if (keys_[i] == hash) return false;
  }
  keys_[i] = hash;
  values_[i] = b;
  ++size_;
  return true;
}

void BlockHashTable::erase(uint64_t hash) {
  size_t i = slot(hash);
  while (keys_[i] != hash || values_[i] == kNoBlock) i = (i + 1) & mask_;
  // Backward-shift: pull later entries of the probe run into the hole so that no lookup
  // stops early at it.
  for (size_t j = (i + 1) & mask_; values_[j] != kNoBlock; j = (j + 1) & mask_) {
    const size_t home = slot(keys_[j]);
    // Move j into the hole i unless its home lies cyclically in (i, j].
    const bool home_in_range = i <= j ? (i < home && home <= j) : (i < home || home <= j);
    if (!home_in_range) {
      keys_[i] = keys_[j];
      values_[i] = values_[j];
      i = j;
    }
  }
  values_[i] = kNoBlock;
  --size_;
}

BlockAllocator::BlockAllocator(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching)
    : num_blocks_(checked_num_blocks(num_blocks)), block_size_(block_size),
      enable_prefix_caching_(enable_prefix_caching),
      cached_(enable_prefix_caching ? num_blocks_ : 0) {
  if (block_size < 1 || block_size > (1 << 20)) {
    throw std::invalid_argument("block_size must be in [1, 2**20], got " +
                                std::to_string(block_size));
  }
  const auto n = static_cast<size_t>(num_blocks);
  ref_.assign(n, 0);
  has_hash_.assign(n, 0);
  hash_.assign(n, 0);
  parent_hash_.assign(n, 0);
  if (enable_prefix_caching) content_.assign(n * static_cast<size_t>(block_size), 0);
  free_ring_.resize(n);
  for (size_t i = 0; i < n; ++i) free_ring_[i] = static_cast<BlockId>(i);
  free_size_ = num_blocks;
  lru_prev_.assign(n, kNoBlock);
  lru_next_.assign(n, kNoBlock);
}

AllocatorStats BlockAllocator::stats() const {
  return AllocatorStats{num_blocks_,          num_free_blocks(), num_used_blocks(),
                        num_cached_blocks(),  evictable_size_,   query_tokens_,
                        hit_tokens_,
                        query_tokens_ ? static_cast<double>(hit_tokens_) / query_tokens_ : 0.0};
}

const SeqBlocks& BlockAllocator::seq(SeqId seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::invalid_argument("unknown sequence " + std::to_string(seq_id));
  return it->second;
}

SeqBlocks& BlockAllocator::seq(SeqId seq_id) {
  return const_cast<SeqBlocks&>(std::as_const(*this).seq(seq_id));
}

const std::vector<BlockId>& BlockAllocator::block_table(SeqId seq_id) const {
  return seq(seq_id).blocks;
}

void BlockAllocator::check_block(BlockId block_id) const {
  if (block_id < 0 || block_id >= num_blocks_) {
    throw std::out_of_range("block id " + std::to_string(block_id) + " out of range [0, " +
                            std::to_string(num_blocks_) + ")");
  }
}

int32_t BlockAllocator::ref_count(BlockId block_id) const {
  check_block(block_id);
  return ref_[block_id];
}

std::optional<uint64_t> BlockAllocator::cached_block_hash(BlockId block_id) const {
  check_block(block_id);
  if (!has_hash_[block_id]) return std::nullopt;
  return hash_[block_id];
}

std::vector<BlockId> BlockAllocator::free_block_ids() const {
  std::vector<BlockId> out;
  out.reserve(static_cast<size_t>(num_free_blocks()));
  for (int64_t i = 0; i < free_size_; ++i) {
    out.push_back(free_ring_[static_cast<size_t>((free_head_ + i) % num_blocks_)]);
  }
  for (BlockId b = lru_head_; b != kNoBlock; b = lru_next_[b]) out.push_back(b);
  return out;
}

void BlockAllocator::lookup(const TokenId* tokens, int64_t num_tokens,
                            std::vector<BlockId>& hits) const {
  hits.clear();
  if (!enable_prefix_caching_ || num_tokens < 1) return;
  const int64_t num_full = (num_tokens - 1) / block_size_;
  const auto bs = static_cast<size_t>(block_size_);
  uint64_t parent = kRootHash;
  for (int64_t i = 0; i < num_full; ++i) {
    const TokenId* blk = tokens + static_cast<size_t>(i) * bs;
    const uint64_t h = hash_block_tokens(parent, blk, bs);
    const BlockId b = cached_.find(h);
    if (b == kNoBlock) break;
    if (parent_hash_[b] != parent ||
        std::memcmp(&content_[static_cast<size_t>(b) * bs], blk, bs * sizeof(TokenId)) != 0) {
      break;  // a hash collision: treat as a miss
    }
    hits.push_back(b);
    parent = h;
  }
}

int64_t BlockAllocator::num_cached_prefix_tokens(const TokenId* tokens, size_t num_tokens) const {
  lookup(tokens, static_cast<int64_t>(num_tokens), scratch_hits_);
  return static_cast<int64_t>(scratch_hits_.size()) * block_size_;
}

std::optional<int64_t> BlockAllocator::allocate(SeqId seq_id, const TokenId* tokens, size_t size,
                                                int64_t num_tokens) {
  if (seqs_.count(seq_id)) {
    throw std::invalid_argument("sequence " + std::to_string(seq_id) + " already has blocks");
  }
  if (num_tokens < 1 || num_tokens > static_cast<int64_t>(size)) {
    throw std::invalid_argument("num_tokens must be in [1, " + std::to_string(size) + "], got " +
                                std::to_string(num_tokens));
  }
  std::vector<BlockId>& hits = scratch_hits_;
  lookup(tokens, num_tokens, hits);
  const auto num_hits = static_cast<int64_t>(hits.size());
  const int64_t num_new = cdiv(num_tokens, block_size_) - num_hits;
  int64_t num_revived = 0;
  for (BlockId b : hits) num_revived += ref_[b] == 0;
  if (num_new > num_free_blocks() - num_revived) return std::nullopt;

  SeqBlocks& s = seqs_[seq_id];
  s.blocks.reserve(static_cast<size_t>(num_hits + num_new));
  for (BlockId b : hits) {
    if (ref_[b] == 0) lru_remove(b);
    ++ref_[b];
    s.blocks.push_back(b);
  }
  for (int64_t i = 0; i < num_new; ++i) s.blocks.push_back(take_free_block());
  s.num_hashed_blocks = num_hits;
  s.last_hash = num_hits ? hash_[hits.back()] : kRootHash;
  const int64_t num_cached = num_hits * block_size_;
  if (enable_prefix_caching_) {
    query_tokens_ += static_cast<int64_t>(size);
    hit_tokens_ += num_cached;
  }
  return num_cached;
}

bool BlockAllocator::append_slots(SeqId seq_id, int64_t num_computed_tokens, int64_t num_tokens,
                                  std::vector<BlockCopy>& copies) {
  return append_slots(seq(seq_id), num_computed_tokens, num_tokens, copies);
}

bool BlockAllocator::append_slots(SeqBlocks& s, int64_t num_computed_tokens, int64_t num_tokens,
                                  std::vector<BlockCopy>& copies) {
  const auto num_held = static_cast<int64_t>(s.blocks.size());
  const int64_t capacity = num_held * block_size_;
  if (num_computed_tokens < 0 || num_computed_tokens >= num_tokens ||
      num_computed_tokens > capacity) {
    throw std::invalid_argument(
        "need 0 <= num_computed_tokens (" + std::to_string(num_computed_tokens) +
        ") < num_tokens (" + std::to_string(num_tokens) + ") and num_computed_tokens <= " +
        std::to_string(capacity) + " slots held");
  }
  const int64_t num_new = std::max<int64_t>(0, cdiv(num_tokens, block_size_) - num_held);
  const int64_t first = num_computed_tokens / block_size_;
  int64_t num_shared = 0;
  for (int64_t i = first; i < num_held; ++i) num_shared += ref_[s.blocks[i]] > 1;
  if (num_new + num_shared > num_free_blocks()) return false;
  if (num_shared) {
    for (int64_t i = first; i < num_held; ++i) {
      const BlockId src = s.blocks[i];
      if (ref_[src] <= 1) continue;
      const BlockId dst = take_free_block();
      --ref_[src];
      s.blocks[i] = dst;
      copies.emplace_back(src, dst);
    }
  }
  for (int64_t i = 0; i < num_new; ++i) s.blocks.push_back(take_free_block());
  return true;
}

void BlockAllocator::cache_blocks(SeqId seq_id, const TokenId* tokens, size_t size,
                                  int64_t num_computed_tokens) {
  cache_blocks(seq(seq_id), tokens, size, num_computed_tokens);
}

void BlockAllocator::cache_blocks(SeqBlocks& s, const TokenId* tokens, size_t size,
                                  int64_t num_computed_tokens) {
  if (num_computed_tokens < 0 || num_computed_tokens > static_cast<int64_t>(size)) {
    throw std::invalid_argument("num_computed_tokens must be in [0, " + std::to_string(size) +
                                "], got " + std::to_string(num_computed_tokens));
  }
  if (!enable_prefix_caching_) return;
  const int64_t num_full =
      std::min(num_computed_tokens / block_size_, static_cast<int64_t>(s.blocks.size()));
  const auto bs = static_cast<size_t>(block_size_);
  for (int64_t i = s.num_hashed_blocks; i < num_full; ++i) {
    const TokenId* blk = tokens + static_cast<size_t>(i) * bs;
    const uint64_t h = hash_block_tokens(s.last_hash, blk, bs);
    const BlockId b = s.blocks[static_cast<size_t>(i)];
    if (!has_hash_[b] && cached_.insert(h, b)) {
      has_hash_[b] = 1;
      hash_[b] = h;
      parent_hash_[b] = s.last_hash;
      std::memcpy(&content_[static_cast<size_t>(b) * bs], blk, bs * sizeof(TokenId));
    }
    s.last_hash = h;
    s.num_hashed_blocks = i + 1;
  }
}

void BlockAllocator::fork(SeqId parent_id, SeqId child_id) {
  const SeqBlocks& parent = seq(parent_id);
  if (seqs_.count(child_id)) {
    throw std::invalid_argument("sequence " + std::to_string(child_id) + " already has blocks");
  }
  for (BlockId b : parent.blocks) ++ref_[b];
  SeqBlocks child = parent;  // copy before emplace: it may rehash the map
  seqs_.emplace(child_id, std::move(child));
}

void BlockAllocator::free(SeqId seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) {
    throw std::invalid_argument("unknown sequence " + std::to_string(seq_id) +
                                " (never allocated or already freed)");
  }
  const std::vector<BlockId>& blocks = it->second.blocks;
  for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) {
    if (--ref_[*b] == 0) {
      if (has_hash_[*b]) {
        lru_push_back(*b);
      } else {
        push_free_uncached(*b);
      }
    }
  }
  seqs_.erase(it);
}

void BlockAllocator::push_free_uncached(BlockId b) {
  free_ring_[static_cast<size_t>((free_head_ + free_size_) % num_blocks_)] = b;
  ++free_size_;
}

BlockId BlockAllocator::take_free_block() {
  BlockId b;
  if (free_size_ > 0) {
    b = free_ring_[static_cast<size_t>(free_head_)];
    free_head_ = (free_head_ + 1) % num_blocks_;
    --free_size_;
  } else {
    assert(lru_head_ != kNoBlock);
    b = lru_head_;
    lru_remove(b);
    cached_.erase(hash_[b]);
    has_hash_[b] = 0;
  }
  ref_[b] = 1;
  return b;
}

void BlockAllocator::lru_push_back(BlockId b) {
  lru_prev_[b] = lru_tail_;
  lru_next_[b] = kNoBlock;
  if (lru_tail_ != kNoBlock) {
    lru_next_[lru_tail_] = b;
  } else {
    lru_head_ = b;
  }
  lru_tail_ = b;
  ++evictable_size_;
}

void BlockAllocator::lru_remove(BlockId b) {
  const BlockId prev = lru_prev_[b];
  const BlockId next = lru_next_[b];
  if (prev != kNoBlock) {
    lru_next_[prev] = next;
  } else {
    lru_head_ = next;
  }
  if (next != kNoBlock) {
    lru_prev_[next] = prev;
  } else {
    lru_tail_ = prev;
  }
  lru_prev_[b] = lru_next_[b] = kNoBlock;
  --evictable_size_;
}

}  // namespace helixflow
