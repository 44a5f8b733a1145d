// The Autograd kernel of the backward ops (autograd.h): run the op below autograd, and where a
// gradient of its outputs could be asked for, give them a node that refuses it.
#include "autograd.h"

#include <torch/csrc/autograd/functions/utils.h>

namespace pyformer::host {
namespace {

struct RefuseDoubleBackward : torch::autograd::Node {
  std::string op;
  explicit RefuseDoubleBackward(std::string name, torch::autograd::edge_list&& edges)
      : Node(std::move(edges)), op(std::move(name)) {}
  variable_list apply(variable_list&& /*grads*/) override {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "pyformer.", op,
                                ": double backward (a gradient of a gradient) is not supported");
  }
};

void no_double_backward(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                        torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t nargs = schema.arguments().size();
  std::vector<at::Tensor> inputs;
  bool any = false;
  if (at::GradMode::is_enabled()) {
    for (size_t i = stack->size() - nargs; i < stack->size(); ++i) {
      const c10::IValue& v = (*stack)[i];
      if (v.isTensor() && v.toTensor().defined()) {
        inputs.push_back(v.toTensor());
        any = any || v.toTensor().requires_grad();
      }
    }
  }
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
  if (!any) return;
  std::string name = schema.name();
  name = name.substr(name.find("::") + 2);
  name = name.substr(0, name.rfind("_backward"));
  const c10::intrusive_ptr<torch::autograd::Node> node =
      c10::make_intrusive<RefuseDoubleBackward>(name, torch::autograd::collect_next_edges(inputs));
  const size_t nret = schema.returns().size();
  for (size_t i = stack->size() - nret; i < stack->size(); ++i) {
    c10::IValue& v = (*stack)[i];
    if (v.isTensor() && v.toTensor().defined() && at::isFloatingType(v.toTensor().scalar_type())) {
      at::Tensor t = v.toTensor();
      torch::autograd::set_history(t, node);
    }
  }
}

}  // namespace

at::Tensor differentiable_softmax_backward(const at::Tensor& y, const at::Tensor& dy) {
  const at::Tensor zero = at::zeros({}, y.options()), dead = y == 0;
  const at::Tensor dyy = at::where(dead, zero, dy * y);
  return at::where(dead, zero, dyy - y * dyy.sum(-1, /*keepdim=*/true));
}

void register_no_double_backward(torch::Library& m, const char* backward_op) {
  m.impl(backward_op, torch::CppFunction::makeFromBoxedFunction<&no_double_backward>());
}

}  // namespace pyformer::host
