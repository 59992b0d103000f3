// helixflow._native: the pybind11 bindings of the native core, all in this one file.
// The hot calls (Scheduler.schedule/update, BatchBuilder.build) release the GIL. Arrays come
// back as numpy views of C++ buffers (base = the owning Python object), never copies.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "helixflow/batch_builder.h"
#include "helixflow/block_allocator.h"
#include "helixflow/cpu_attention.h"
#include "helixflow/scheduler.h"

#ifndef HELIXFLOW_BUILD_INFO
#define HELIXFLOW_BUILD_INFO "unknown"
#endif

namespace py = pybind11;
using namespace helixflow;  // NOLINT: bindings only

namespace {

using IdArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

template <typename T>
py::array_t<T> view(const T* data, std::vector<py::ssize_t> shape, py::handle base) {
  for (py::ssize_t d : shape) {
    if (d == 0) return py::array_t<T>(shape);  // numpy would allocate for a null pointer
  }
  return py::array_t<T>(shape, data, base);
}

const int64_t* ids_data(const IdArray& a) {
  if (a.ndim() > 1) throw std::invalid_argument("token ids must be a 1-d sequence");
  return a.data();
}

// Token ids for the allocator's own API: int64 in, checked, int32 out.
std::vector<TokenId> to_token_ids(const IdArray& a) {
  const int64_t* p = ids_data(a);
  std::vector<TokenId> out(static_cast<size_t>(a.size()));
  for (size_t i = 0; i < out.size(); ++i) {
    if (p[i] < 0 || p[i] > INT32_MAX) {
      throw std::invalid_argument("token_ids must hold token ids in [0, 2**31)");
    }
    out[i] = static_cast<TokenId>(p[i]);
  }
  return out;
}

py::list copies_list(const std::vector<BlockCopy>& copies) {
  py::list out;
  for (const auto& [src, dst] : copies) out.append(py::make_tuple(src, dst));
  return out;
}

py::dict allocator_stats(const AllocatorStats& s) {
  py::dict d;
  d["num_blocks"] = s.num_blocks;
  d["num_free_blocks"] = s.num_free_blocks;
  d["num_used_blocks"] = s.num_used_blocks;
  d["num_cached_blocks"] = s.num_cached_blocks;
  d["num_evictable_blocks"] = s.num_evictable_blocks;
  d["prefix_query_tokens"] = s.prefix_query_tokens;
  d["prefix_hit_tokens"] = s.prefix_hit_tokens;
  d["prefix_hit_rate"] = s.prefix_hit_rate;
  return d;
}

void bind_allocator(py::module_& m) {
  py::class_<BlockAllocator>(m, "BlockAllocator", R"doc(
Reference-counted paged KV blocks with prefix caching and copy-on-write forks.

Shortage is a return value (None); misuse raises ValueError (IndexError for a bad block id).
Not thread-safe: one engine thread owns it.)doc")
      .def(py::init<int64_t, int64_t, bool>(), py::arg("num_blocks"), py::arg("block_size"),
           py::arg("enable_prefix_caching") = true)
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("block_size", &BlockAllocator::block_size)
      .def_property_readonly("enable_prefix_caching", &BlockAllocator::enable_prefix_caching)
      .def_property_readonly("num_free_blocks", &BlockAllocator::num_free_blocks)
      .def_property_readonly("num_used_blocks", &BlockAllocator::num_used_blocks)
      .def_property_readonly("num_cached_blocks", &BlockAllocator::num_cached_blocks)
      .def_property_readonly("usage", &BlockAllocator::usage)
      .def("stats", [](const BlockAllocator& a) { return allocator_stats(a.stats()); })
      .def("has_seq", &BlockAllocator::has_seq, py::arg("seq_id"))
      .def("block_table", &BlockAllocator::block_table, py::arg("seq_id"))
      .def("ref_count", &BlockAllocator::ref_count, py::arg("block_id"))
      .def("cached_block_hash", &BlockAllocator::cached_block_hash, py::arg("block_id"))
      .def("free_block_ids", &BlockAllocator::free_block_ids)
      .def(
          "num_cached_prefix_tokens",
          [](const BlockAllocator& a, const IdArray& token_ids) {
            const std::vector<TokenId> t = to_token_ids(token_ids);
            return a.num_cached_prefix_tokens(t.data(), t.size());
          },
          py::arg("token_ids"))
      .def(
          "allocate",
          [](BlockAllocator& a, SeqId seq_id, const IdArray& token_ids, int64_t num_tokens) {
            const std::vector<TokenId> t = to_token_ids(token_ids);
            return a.allocate(seq_id, t.data(), t.size(), num_tokens);
          },
          py::arg("seq_id"), py::arg("token_ids"), py::arg("num_tokens"))
      .def(
          "append_slots",
          [](BlockAllocator& a, SeqId seq_id, int64_t num_computed_tokens,
             int64_t num_tokens) -> py::object {
            std::vector<BlockCopy> copies;
            if (!a.append_slots(seq_id, num_computed_tokens, num_tokens, copies)) {
              return py::none();
            }
            return copies_list(copies);
          },
          py::arg("seq_id"), py::arg("num_computed_tokens"), py::arg("num_tokens"))
      .def(
          "cache_blocks",
          [](BlockAllocator& a, SeqId seq_id, const IdArray& token_ids,
             int64_t num_computed_tokens) {
            const std::vector<TokenId> t = to_token_ids(token_ids);
            a.cache_blocks(seq_id, t.data(), t.size(), num_computed_tokens);
          },
          py::arg("seq_id"), py::arg("token_ids"), py::arg("num_computed_tokens"))
      .def("fork", &BlockAllocator::fork, py::arg("parent_id"), py::arg("child_id"))
      .def("free", &BlockAllocator::free, py::arg("seq_id"));
}

void bind_outputs(py::module_& m) {
  py::class_<SchedulerOutput>(m, "SchedulerOutput", "What one schedule() decided (batch order).")
      .def_property_readonly("req_ids",
                             [](py::object self) {
                               const auto& o = self.cast<const SchedulerOutput&>();
                               return view(o.req_ids.data(), {py::ssize_t(o.req_ids.size())}, self);
                             })
      .def_property_readonly(
          "num_scheduled_tokens",
          [](py::object self) {
            const auto& o = self.cast<const SchedulerOutput&>();
            return view(o.num_scheduled_tokens.data(),
                        {py::ssize_t(o.num_scheduled_tokens.size())}, self);
          })
      .def_property_readonly(
          "num_computed_tokens",
          [](py::object self) {
            const auto& o = self.cast<const SchedulerOutput&>();
            return view(o.num_computed_tokens.data(), {py::ssize_t(o.num_computed_tokens.size())},
                        self);
          })
      .def_readonly("total_num_scheduled_tokens", &SchedulerOutput::total_num_scheduled_tokens)
      .def_readonly("preempted_ids", &SchedulerOutput::preempted_ids)
      .def_property_readonly("blocks_to_copy",
                             [](const SchedulerOutput& o) { return copies_list(o.blocks_to_copy); })
      .def_property_readonly("num_reqs",
                             [](const SchedulerOutput& o) { return o.req_ids.size(); });

  py::class_<UpdateOutput>(m, "UpdateOutput", "New tokens (step order) and finished requests.")
      .def_property_readonly("req_ids",
                             [](py::object self) {
                               const auto& o = self.cast<const UpdateOutput&>();
                               return view(o.req_ids.data(), {py::ssize_t(o.req_ids.size())}, self);
                             })
      .def_property_readonly("token_ids",
                             [](py::object self) {
                               const auto& o = self.cast<const UpdateOutput&>();
                               return view(o.token_ids.data(), {py::ssize_t(o.token_ids.size())},
                                           self);
                             })
      .def_property_readonly("finished", [](const UpdateOutput& o) {
        py::list out;
        for (const auto& [rid, reason] : o.finished) {
          out.append(py::make_tuple(rid, finish_reason_name(reason)));
        }
        return out;
      });
}

void bind_scheduler(py::module_& m) {
  py::class_<Scheduler>(m, "Scheduler", R"doc(
Token-budget continuous-batching scheduler over a paged KV cache; owns its BlockAllocator.

See helixflow.pool.reference.scheduler for the full specification. schedule(), update() and
BatchBuilder.build() release the GIL. Not thread-safe: one engine thread owns it.)doc")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, bool>(), py::arg("num_blocks"),
           py::arg("block_size"), py::kw_only(), py::arg("max_num_batched_tokens") = 2048,
           py::arg("max_num_seqs") = 256, py::arg("max_model_len") = 4096,
           py::arg("enable_prefix_caching") = true)
      .def_property_readonly("allocator", &Scheduler::allocator,
                             py::return_value_policy::reference_internal)
      .def_property_readonly("block_size", &Scheduler::block_size)
      .def_property_readonly("max_num_batched_tokens", &Scheduler::max_num_batched_tokens)
      .def_property_readonly("max_num_seqs", &Scheduler::max_num_seqs)
      .def_property_readonly("max_model_len", &Scheduler::max_model_len)
      .def_property_readonly("num_waiting", &Scheduler::num_waiting)
      .def_property_readonly("num_running", &Scheduler::num_running)
      .def("has_request", &Scheduler::has_request, py::arg("request_id"))
      .def("waiting_ids", &Scheduler::waiting_ids)
      .def("running_ids", &Scheduler::running_ids)
      .def(
          "request_info",
          [](const Scheduler& s, int64_t request_id) {
            const Request& r = s.request(request_id);
            py::dict d;
            d["status"] = r.running ? "running" : "waiting";
            d["num_prompt_tokens"] = r.num_prompt_tokens;
            d["num_tokens"] = r.num_tokens();
            d["num_computed_tokens"] = r.num_computed_tokens;
            d["output_token_ids"] = std::vector<TokenId>(
                r.token_ids.begin() + static_cast<std::ptrdiff_t>(r.num_prompt_tokens),
                r.token_ids.end());
            d["num_preemptions"] = r.num_preemptions;
            d["priority"] = r.params.priority;
            return d;
          },
          py::arg("request_id"))
      .def("stats",
           [](const Scheduler& s) {
             const SchedulerStats st = s.stats();
             py::dict d;
             d["num_running"] = st.num_running;
             d["num_waiting"] = st.num_waiting;
             d["num_preemptions"] = st.num_preemptions;
             d["kv_cache_usage"] = st.kv_cache_usage;
             return d;
           })
      .def(
          "add_request",
          [](Scheduler& s, int64_t request_id, const IdArray& prompt_token_ids,
             int64_t max_tokens, int64_t min_tokens, std::vector<int64_t> eos_token_ids,
             std::vector<int64_t> stop_token_ids, bool ignore_eos, int64_t priority) {
            RequestParams p;
            p.max_tokens = max_tokens;
            p.min_tokens = min_tokens;
            p.eos_token_ids = std::move(eos_token_ids);
            p.stop_token_ids = std::move(stop_token_ids);
            p.ignore_eos = ignore_eos;
            p.priority = priority;
            s.add_request(request_id, ids_data(prompt_token_ids),
                          static_cast<size_t>(prompt_token_ids.size()), std::move(p));
          },
          py::arg("request_id"), py::arg("prompt_token_ids"), py::kw_only(),
          py::arg("max_tokens"), py::arg("min_tokens") = 0,
          py::arg("eos_token_ids") = std::vector<int64_t>{},
          py::arg("stop_token_ids") = std::vector<int64_t>{}, py::arg("ignore_eos") = false,
          py::arg("priority") = 0)
      .def("abort", &Scheduler::abort, py::arg("request_id"))
      .def("fork", &Scheduler::fork, py::arg("parent_id"), py::arg("child_id"))
      .def("schedule", &Scheduler::schedule, py::call_guard<py::gil_scoped_release>())
      .def(
          "update",
          [](Scheduler& s, const IdArray& sampled_token_ids) {
            const int64_t* data = sampled_token_ids.data();
            const auto n = static_cast<size_t>(sampled_token_ids.size());
            py::gil_scoped_release release;
            return s.update(data, n);
          },
          py::arg("sampled_token_ids"));
}

void bind_batch_builder(py::module_& m) {
  py::class_<BatchBuilder>(m, "BatchBuilder", R"doc(
Preallocated flat-batch buffers: input ids, positions, slot mapping, block tables, sequence
lengths and query start offsets, exposed as numpy views (torch.from_numpy shares them).
build() overwrites them and releases the GIL. Not thread-safe.)doc")
      .def(py::init<int64_t, int64_t, int64_t, int64_t>(), py::arg("max_num_seqs"),
           py::arg("max_num_batched_tokens"), py::arg("max_blocks_per_seq"),
           py::arg("block_size"))
      .def_static(
          "for_scheduler",
          [](const Scheduler& s) {
            return BatchBuilder(s.max_num_seqs(), s.max_num_batched_tokens(),
                                cdiv(s.max_model_len(), s.block_size()), s.block_size());
          },
          py::arg("scheduler"))
      .def("build", &BatchBuilder::build, py::arg("scheduler"), py::arg("pad_to") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_tokens", &BatchBuilder::num_tokens)
      .def_property_readonly("num_seqs", &BatchBuilder::num_seqs)
      .def_property_readonly("input_ids",
                             [](py::object self) {
                               auto& b = self.cast<BatchBuilder&>();
                               return view(b.input_ids(), {b.max_num_batched_tokens()}, self);
                             })
      .def_property_readonly("positions",
                             [](py::object self) {
                               auto& b = self.cast<BatchBuilder&>();
                               return view(b.positions(), {b.max_num_batched_tokens()}, self);
                             })
      .def_property_readonly("slot_mapping",
                             [](py::object self) {
                               auto& b = self.cast<BatchBuilder&>();
                               return view(b.slot_mapping(), {b.max_num_batched_tokens()}, self);
                             })
      .def_property_readonly("block_tables",
                             [](py::object self) {
                               auto& b = self.cast<BatchBuilder&>();
                               return view(b.block_tables(),
                                           {b.max_num_seqs(), b.max_blocks_per_seq()}, self);
                             })
      .def_property_readonly("seq_lens",
                             [](py::object self) {
                               auto& b = self.cast<BatchBuilder&>();
                               return view(b.seq_lens(), {b.max_num_seqs()}, self);
                             })
      .def_property_readonly("query_start_loc", [](py::object self) {
        auto& b = self.cast<BatchBuilder&>();
        return view(b.query_start_loc(), {b.max_num_seqs() + 1}, self);
      });
}

// ---- CPU attention ------------------------------------------------------------------------------
// Arrays arrive as numpy views of torch CPU tensors (tensor.numpy(): no copy); every property the
// kernel relies on is checked here, with the argument's name in the error.
template <typename T>
void check_array(const char* name, const py::array& a, py::ssize_t ndim, bool contiguous) {
  if (!a.dtype().is(py::dtype::of<T>())) {
    throw std::invalid_argument(std::string(name) + " must be " +
                                (std::is_same_v<T, float> ? "float32" : "int32") + ", got " +
                                std::string(py::str(a.dtype())));
  }
  if (a.ndim() != ndim) {
    throw std::invalid_argument(std::string(name) + " must have " + std::to_string(ndim) +
                                " dimensions, got " + std::to_string(a.ndim()));
  }
  const bool ok = contiguous ? (a.flags() & py::array::c_style) != 0
                             : a.shape(ndim - 1) <= 1 || a.strides(ndim - 1) == sizeof(T);
  if (!ok) {
    throw std::invalid_argument(std::string(name) + (contiguous ? " must be contiguous"
                                                                : " must have a unit last stride"));
  }
  for (py::ssize_t d = 0; d < ndim; ++d) {
    if (a.strides(d) % static_cast<py::ssize_t>(sizeof(T)) != 0 || a.strides(d) < 0) {
      throw std::invalid_argument(std::string(name) + " has unaligned or negative strides");
    }
  }
}

void check_dim(const char* name, py::ssize_t got, py::ssize_t want, const char* what) {
  if (got != want) {
    throw std::invalid_argument(std::string(name) + ": expected " + what + " = " +
                                std::to_string(want) + ", got " + std::to_string(got));
  }
}

void bind_cpu_attention(py::module_& m) {
  m.def(
      "paged_decode_attention",
      [](const py::array& q, const py::array& key_cache, const py::array& value_cache,
         const py::array& block_tables, const py::array& seq_lens, float scale,
         int64_t sliding_window, py::array& out, int num_threads) {
        check_array<float>("q", q, 3, false);
        check_array<float>("key_cache", key_cache, 4, true);
        check_array<float>("value_cache", value_cache, 4, true);
        check_array<int32_t>("block_tables", block_tables, 2, false);
        check_array<int32_t>("seq_lens", seq_lens, 1, true);
        check_array<float>("out", out, 3, false);
        if (!out.writeable()) throw std::invalid_argument("out must be writeable");
        for (py::ssize_t d = 0; d < 4; ++d) {
          check_dim("value_cache", value_cache.shape(d), key_cache.shape(d), "key_cache's shape");
        }
        const py::ssize_t num_seqs = q.shape(0);
        check_dim("q", q.shape(2), key_cache.shape(3), "head_dim");
        check_dim("block_tables", block_tables.shape(0), num_seqs, "num_seqs");
        check_dim("seq_lens", seq_lens.shape(0), num_seqs, "num_seqs");
        for (py::ssize_t d = 0; d < 3; ++d) check_dim("out", out.shape(d), q.shape(d), "q's shape");
        if (sliding_window < 0) throw std::invalid_argument("sliding_window must be >= 0");
        PagedDecodeArgs a;
        a.q = static_cast<const float*>(q.data());
        a.q_seq_stride = q.strides(0) / 4;
        a.q_head_stride = q.strides(1) / 4;
        a.key_cache = static_cast<const float*>(key_cache.data());
        a.value_cache = static_cast<const float*>(value_cache.data());
        a.num_blocks = key_cache.shape(0);
        a.block_size = key_cache.shape(1);
        a.num_kv_heads = key_cache.shape(2);
        a.head_dim = key_cache.shape(3);
        a.num_heads = q.shape(1);
        a.num_seqs = num_seqs;
        a.block_tables = static_cast<const int32_t*>(block_tables.data());
        a.table_width = block_tables.shape(1);
        a.table_stride = block_tables.strides(0) / 4;
        a.seq_lens = static_cast<const int32_t*>(seq_lens.data());
        a.scale = scale;
        a.sliding_window = sliding_window;
        a.out = static_cast<float*>(out.mutable_data());
        a.out_seq_stride = out.strides(0) / 4;
        a.out_head_stride = out.strides(1) / 4;
        py::gil_scoped_release release;
        paged_decode_attention(a, num_threads);
      },
      py::arg("q"), py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"),
      py::arg("seq_lens"), py::arg("scale"), py::arg("sliding_window"), py::arg("out"),
      py::arg("num_threads") = 1,
      "Decode attention over a paged fp32 KV cache, in place into out (see cpu_attention.h).");
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "HelixFlow's native engine core: BlockAllocator, Scheduler, BatchBuilder, CPU attention.";
  m.attr("__build_info__") = HELIXFLOW_BUILD_INFO;
  m.attr("ROOT_HASH") = py::int_(kRootHash);
  m.def(
      "hash_block_tokens",
      [](uint64_t parent_hash, const IdArray& token_ids) {
        const std::vector<TokenId> t = to_token_ids(token_ids);
        return hash_block_tokens(parent_hash, t.data(), t.size());
      },
      py::arg("parent_hash"), py::arg("token_ids"),
      "Chained 64-bit hash of one block (same values as the Python reference).");
  bind_allocator(m);
  bind_outputs(m);
  bind_scheduler(m);
  bind_batch_builder(m);
  bind_cpu_attention(m);
}
