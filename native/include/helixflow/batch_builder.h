// Writes the scheduler's open step into preallocated flat-batch buffers (input ids, positions,
// slot mapping, block tables, sequence lengths, query start offsets) that Python sees as numpy
// arrays without a copy. Mirrors helixflow/pool/reference/batch_builder.py exactly.
// Not thread-safe: build on the engine thread that owns the scheduler.
#pragma once

#include <cstdint>
#include <vector>

#include "helixflow/scheduler.h"

namespace helixflow {

class BatchBuilder {
 public:
  BatchBuilder(int64_t max_num_seqs, int64_t max_num_batched_tokens, int64_t max_blocks_per_seq,
               int64_t block_size);

  // Fills the buffers; returns the number of tokens (before padding to pad_to).
  int64_t build(const Scheduler& scheduler, int64_t pad_to = 0);

  int64_t max_num_seqs() const { return max_num_seqs_; }
  int64_t max_num_batched_tokens() const { return max_num_batched_tokens_; }
  int64_t max_blocks_per_seq() const { return max_blocks_per_seq_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t num_seqs() const { return num_seqs_; }

  int32_t* input_ids() { return input_ids_.data(); }
  int64_t* positions() { return positions_.data(); }
  int64_t* slot_mapping() { return slot_mapping_.data(); }
  int32_t* block_tables() { return block_tables_.data(); }
  int32_t* seq_lens() { return seq_lens_.data(); }
  int32_t* query_start_loc() { return query_start_loc_.data(); }

 private:
  int64_t max_num_seqs_;
  int64_t max_num_batched_tokens_;
  int64_t max_blocks_per_seq_;
  int64_t block_size_;
  int64_t num_tokens_ = 0;
  int64_t num_seqs_ = 0;
  std::vector<int32_t> input_ids_;
  std::vector<int64_t> positions_;
  std::vector<int64_t> slot_mapping_;
  std::vector<int32_t> block_tables_;  // [max_num_seqs, max_blocks_per_seq]
  std::vector<int32_t> seq_lens_;
  std::vector<int32_t> query_start_loc_;  // [max_num_seqs + 1]
};

}  // namespace helixflow
