// Registration of pcg::SegmentChain as torch.classes.pcg.SegmentChain.
#include <torch/library.h>

#include "graph/segment_chain.h"

namespace pcg {

TORCH_LIBRARY_FRAGMENT(pcg, m) {
  m.class_<SegmentChain>("SegmentChain")
      .def(torch::init<>())
      .def("capture_begin", &SegmentChain::capture_begin)
      .def("capture_end", &SegmentChain::capture_end)
      .def("abort", &SegmentChain::abort)
      .def("record_call", &SegmentChain::record_call)
      .def("replay", &SegmentChain::replay)
      .def("replay_staged", &SegmentChain::replay_staged)
      .def("replay_graph", &SegmentChain::replay_graph)
      .def("run_call", &SegmentChain::run_call)
      .def("num_graphs", &SegmentChain::num_graphs)
      .def("num_calls", &SegmentChain::num_calls)
      .def("call_names", &SegmentChain::call_names)
      .def("reset", &SegmentChain::reset);
}

}  // namespace pcg
