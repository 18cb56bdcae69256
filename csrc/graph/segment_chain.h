// SegmentChain: the replay loop of one captured bucket, in C++.
//
// A piecewise forward is graph 0, split call 0, graph 1, split call 1, ...
// The capture session builds the chain (capture_begin / capture_end around
// each segment, record_call for each split op) and replay() runs the whole
// forward from one call: replay graph i, then call the recorded op i through
// the dispatcher with its recorded (weakly referenced) arguments.
//
// Usable directly from C++ (this header) or from Python as
// torch.classes.pcg.SegmentChain.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAGraph.h>
#include <torch/custom_class.h>

#include "graph/stage_batch_op.h"

#include <memory>
#include <string>
#include <vector>

namespace pcg {

struct RecordedCall {
  c10::OperatorHandle op;
  std::vector<c10::IValue> args;
};

class SegmentChain : public torch::CustomClassHolder {
 public:
  // Starts capturing the next segment on the current stream, into the shared
  // pool (pool_hi, pool_lo) = torch.cuda.graph_pool_handle().
  void capture_begin(int64_t pool_hi, int64_t pool_lo) {
    TORCH_CHECK(!capturing_, "pcg::SegmentChain: capture_begin while a segment is capturing");
    TORCH_CHECK(graphs_.size() == calls_.size(),
                "pcg::SegmentChain: each segment after the first must follow a recorded call");
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    graph->capture_begin({static_cast<c10::CaptureId_t>(pool_hi),
                          static_cast<c10::CaptureId_t>(pool_lo)});
    graphs_.push_back(std::move(graph));
    capturing_ = true;
  }

  void capture_end() {
    TORCH_CHECK(capturing_, "pcg::SegmentChain: capture_end without capture_begin");
    capturing_ = false;
    graphs_.back()->capture_end();
  }

  // Abandons a failed capture (the stream is left out of capture mode).
  void abort() {
    if (capturing_) {
      capturing_ = false;
      try {
        graphs_.back()->capture_end();
      } catch (...) {
      }
    }
    graphs_.clear();
    calls_.clear();
  }

  // Records the split call that runs after the segment just captured.
  // `op` is "namespace::name" or "namespace::name.overload".
  void record_call(const std::string& op, std::vector<c10::IValue> args) {
    TORCH_CHECK(!capturing_, "pcg::SegmentChain: record_call while a segment is capturing");
    TORCH_CHECK(calls_.size() + 1 == graphs_.size(),
                "pcg::SegmentChain: record_call must follow exactly one captured segment");
    auto dot = op.find('.');
    std::string name = dot == std::string::npos ? op : op.substr(0, dot);
    std::string overload = dot == std::string::npos ? "" : op.substr(dot + 1);
    auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
    TORCH_CHECK(args.size() == handle.schema().arguments().size(), "pcg::SegmentChain: ", op,
                " takes ", handle.schema().arguments().size(), " arguments, got ", args.size());
    calls_.push_back(RecordedCall{handle, std::move(args)});
  }

  // One forward: every graph in order, each followed by its recorded call.
  void replay() {
    check_replayable();
    for (size_t i = 0; i < graphs_.size(); ++i) {
      graphs_[i]->replay();
      if (i < calls_.size()) {
        torch::jit::Stack stack(calls_[i].args);
        calls_[i].op.callBoxed(stack);
      }
    }
  }

  // One forward on new inputs, staged by one kernel (pcg::stage_batch): the
  // ids (and positions) into the static buffers, `values` (num_valid, and the
  // sequence starts attention inside the graphs reads) into `batch`; replay.
  void replay_staged(const at::Tensor& ids, const std::optional<at::Tensor>& positions,
                     const at::Tensor& static_ids, const at::Tensor& static_pos,
                     const at::Tensor& batch, const std::vector<int64_t>& values) {
    check_replayable();  // before staging: a misuse leaves the inputs as they were
    stage_batch_cuda(ids, positions, static_ids, static_pos, batch, values);
    replay();
  }

  // One piece of a forward, for diagnostics (timing each launch): graph i,
  // or recorded call i. A forward is graph 0, call 0, graph 1, ...
  void replay_graph(int64_t i) {
    TORCH_CHECK(!capturing_ && i >= 0 && i < num_graphs(), "pcg::SegmentChain: no graph ", i);
    graphs_[i]->replay();
  }
  void run_call(int64_t i) {
    TORCH_CHECK(!capturing_ && i >= 0 && i < num_calls(), "pcg::SegmentChain: no call ", i);
    torch::jit::Stack stack(calls_[i].args);
    calls_[i].op.callBoxed(stack);
  }

  int64_t num_graphs() const { return static_cast<int64_t>(graphs_.size()); }
  int64_t num_calls() const { return static_cast<int64_t>(calls_.size()); }

  std::vector<std::string> call_names() const {
    std::vector<std::string> out;
    for (const auto& c : calls_) out.push_back(c.op.schema().operator_name().name);
    return out;
  }

  void reset() {
    TORCH_CHECK(!capturing_, "pcg::SegmentChain: reset while capturing");
    calls_.clear();
    graphs_.clear();
  }

 private:
  void check_replayable() const {
    TORCH_CHECK(!capturing_, "pcg::SegmentChain: replay while capturing");
    TORCH_CHECK(!graphs_.empty(), "pcg::SegmentChain: nothing captured");
    TORCH_CHECK(calls_.size() + 1 == graphs_.size(),
                "pcg::SegmentChain: the chain must end with a captured segment");
  }

  std::vector<std::unique_ptr<at::cuda::CUDAGraph>> graphs_;
  std::vector<RecordedCall> calls_;
  bool capturing_ = false;
};

}  // namespace pcg
