#include "helixflow/batch_builder.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

namespace helixflow {

namespace {
void check_at_least_one(const char* name, int64_t value) {
  if (value < 1) {
    throw std::invalid_argument(std::string(name) + " must be >= 1, got " + std::to_string(value));
  }
}
}  // namespace

BatchBuilder::BatchBuilder(int64_t max_num_seqs, int64_t max_num_batched_tokens,
                           int64_t max_blocks_per_seq, int64_t block_size)
    : max_num_seqs_(max_num_seqs), max_num_batched_tokens_(max_num_batched_tokens),
      max_blocks_per_seq_(max_blocks_per_seq), block_size_(block_size) {
  check_at_least_one("max_num_seqs", max_num_seqs);
  check_at_least_one("max_num_batched_tokens", max_num_batched_tokens);
  check_at_least_one("max_blocks_per_seq", max_blocks_per_seq);
  check_at_least_one("block_size", block_size);
  const auto t = static_cast<size_t>(max_num_batched_tokens);
  const auto s = static_cast<size_t>(max_num_seqs);
  input_ids_.assign(t, 0);
  positions_.assign(t, 0);
  slot_mapping_.assign(t, -1);
  block_tables_.assign(s * static_cast<size_t>(max_blocks_per_seq), 0);
  seq_lens_.assign(s, 0);
  query_start_loc_.assign(s + 1, 0);
}

int64_t BatchBuilder::build(const Scheduler& scheduler, int64_t pad_to) {
  if (!scheduler.in_step_) {
    throw std::runtime_error("build() needs a step: call scheduler.schedule() first");
  }
  if (scheduler.block_size() != block_size_) {
    throw std::invalid_argument("block_size mismatch: scheduler " +
                                std::to_string(scheduler.block_size()) + ", builder " +
                                std::to_string(block_size_));
  }
  const size_t num_rows = scheduler.num_step_rows_;
  int64_t num_tokens = 0;
  for (size_t i = 0; i < num_rows; ++i) num_tokens += scheduler.step_[i]->num_scheduled;
  if (static_cast<int64_t>(num_rows) > max_num_seqs_) {
    throw std::invalid_argument(std::to_string(num_rows) + " sequences exceed max_num_seqs=" +
                                std::to_string(max_num_seqs_));
  }
  if (std::max(num_tokens, pad_to) > max_num_batched_tokens_) {
    throw std::invalid_argument(std::to_string(std::max(num_tokens, pad_to)) +
                                " tokens exceed max_num_batched_tokens=" +
                                std::to_string(max_num_batched_tokens_));
  }
  const int64_t bs = block_size_;
  int64_t t = 0;
  query_start_loc_[0] = 0;
  for (size_t i = 0; i < num_rows; ++i) {
    const Request& req = *scheduler.step_[i];
    if (req.finished) {
      throw std::invalid_argument("request " + std::to_string(req.request_id) +
                                  " was aborted after schedule(): build() comes first");
    }
    // NOTE: looked up on every use, never cached: Python may free a sequence through
    // scheduler.allocator, and a stale pointer would write into another sequence's blocks.
    const BlockId* table = scheduler.allocator_.block_table(req.request_id).data();
    const int64_t start = req.num_computed_tokens;
    const int64_t n = req.num_scheduled;
    const int64_t seq_len = start + n;
    const int64_t num_blocks = cdiv(seq_len, bs);
    if (num_blocks > max_blocks_per_seq_) {
      throw std::invalid_argument("request " + std::to_string(req.request_id) + " needs " +
                                  std::to_string(num_blocks) + " blocks > max_blocks_per_seq=" +
                                  std::to_string(max_blocks_per_seq_));
    }
    std::memcpy(&input_ids_[static_cast<size_t>(t)], &req.token_ids[static_cast<size_t>(start)],
                static_cast<size_t>(n) * sizeof(int32_t));
    int64_t* pos = &positions_[static_cast<size_t>(t)];
    int64_t* slot = &slot_mapping_[static_cast<size_t>(t)];
    for (int64_t p = start, k = 0; p < seq_len; ++p, ++k) {
      pos[k] = p;
      slot[k] = static_cast<int64_t>(table[p / bs]) * bs + p % bs;
    }
    std::memcpy(&block_tables_[i * static_cast<size_t>(max_blocks_per_seq_)], table,
                static_cast<size_t>(num_blocks) * sizeof(int32_t));
    seq_lens_[i] = static_cast<int32_t>(seq_len);
    t += n;
    query_start_loc_[i + 1] = static_cast<int32_t>(t);
  }
  for (int64_t k = t; k < pad_to; ++k) {
    input_ids_[static_cast<size_t>(k)] = 0;
    positions_[static_cast<size_t>(k)] = 0;
    slot_mapping_[static_cast<size_t>(k)] = -1;
  }
  num_tokens_ = t;
  num_seqs_ = static_cast<int64_t>(num_rows);
  return t;
}

}  // namespace helixflow
