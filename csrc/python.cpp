// pyformer._C: the Python module. `import pyformer._C` loads this library, and with it the
// schemas (ops.cpp), host entries, autograd and kernels; no pybind11.
//
// Besides build_info, it holds one fast entry per public op (pyformer.functional calls them):
// each parses its Python arguments directly and calls the op through the dispatcher, so a call
// costs about what a PyTorch op's own binding costs (torch.ops.pyformer.<op> goes through the
// generic OpOverload machinery first, several microseconds per call). The dispatcher call is the
// same one torch.ops makes: autograd (csrc/host/), dispatch modes, fake tensors and device
// dispatch all apply. pyformer.functional takes the torch.ops path instead while torch.compile
// traces and when an argument or mode overrides __torch_function__.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <dlfcn.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "cpu/blas.h"
#include "kernels.h"
#include "pyformer.h"

#ifndef PYFORMER_CUDA_ARCHS
#define PYFORMER_CUDA_ARCHS ""
#endif

namespace {

// ---- argument parsing (raises TypeError naming the op and the argument) ------------------------

[[noreturn]] void type_error(const char* op, const char* arg, const char* expected, PyObject* got) {
  throw torch::TypeError(std::string("pyformer.") + op + ": argument '" + arg + "': expected " +
                         expected + ", got " + Py_TYPE(got)->tp_name);
}

const at::Tensor& tensor(const char* op, const char* arg, PyObject* o) {
  if (!THPVariable_Check(o)) type_error(op, arg, "a Tensor", o);
  return THPVariable_Unpack(o);
}

std::optional<at::Tensor> opt_tensor(const char* op, const char* arg, PyObject* o) {
  if (o == Py_None) return std::nullopt;
  return tensor(op, arg, o);
}

double real(const char* op, const char* arg, PyObject* o) {
  if (PyFloat_Check(o)) return PyFloat_AS_DOUBLE(o);
  if (PyBool_Check(o) || !(PyLong_Check(o) || PyIndex_Check(o) || PyNumber_Check(o)))
    type_error(op, arg, "a real number", o);
  const double v = PyFloat_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) throw python_error();
  return v;
}

std::optional<double> opt_real(const char* op, const char* arg, PyObject* o) {
  if (o == Py_None) return std::nullopt;
  return real(op, arg, o);
}

bool boolean(const char* op, const char* arg, PyObject* o) {
  if (!PyBool_Check(o)) type_error(op, arg, "a bool", o);
  return o == Py_True;
}

// causal: False (0), True or "top_left" (1), "bottom_right" (2), the schema's int code.
int64_t causal_code(const char* op, PyObject* o) {
  if (PyBool_Check(o)) return o == Py_True ? 1 : 0;
  if (PyUnicode_Check(o)) {
    const char* s = PyUnicode_AsUTF8(o);
    if (s == nullptr) throw python_error();
    if (std::strcmp(s, "top_left") == 0) return 1;
    if (std::strcmp(s, "bottom_right") == 0) return 2;
  }
  type_error(op, "causal", "a bool, \"top_left\" or \"bottom_right\"", o);
}

int64_t integer(const char* op, const char* arg, PyObject* o) {
  if (PyBool_Check(o) || !PyIndex_Check(o)) type_error(op, arg, "an int or a sequence of ints", o);
  const int64_t v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) throw python_error();
  return v;
}

// normalized_shape: an int or a sequence of ints (torch.Size, list, tuple).
std::vector<int64_t> int_list(const char* op, const char* arg, PyObject* o) {
  if (PyLong_Check(o) || PyIndex_Check(o)) return {integer(op, arg, o)};
  if (!PySequence_Check(o) || PyUnicode_Check(o))
    type_error(op, arg, "an int or a sequence of ints", o);
  PyObject* seq = PySequence_Fast(o, "normalized_shape");
  if (seq == nullptr) throw python_error();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  std::vector<int64_t> out(n);
  try {
    for (Py_ssize_t i = 0; i < n; ++i) out[i] = integer(op, arg, PySequence_Fast_GET_ITEM(seq, i));
  } catch (...) {
    Py_DECREF(seq);
    throw;
  }
  Py_DECREF(seq);
  return out;
}

void want_args(const char* op, Py_ssize_t nargs, Py_ssize_t n) {
  if (nargs != n) {
    throw torch::TypeError(std::string("pyformer._C.") + op + ": expected " + std::to_string(n) +
                           " arguments, got " + std::to_string(nargs));
  }
}

PyObject* wrap(at::Tensor t) { return THPVariable_Wrap(std::move(t)); }
// (a, b), stealing both references.
PyObject* pair(PyObject* a, PyObject* b) {
  PyObject* t = (a != nullptr && b != nullptr) ? PyTuple_Pack(2, a, b) : nullptr;
  Py_XDECREF(a);
  Py_XDECREF(b);
  return t;
}

// The GIL is released while the op runs, as torch's own bindings do.
struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

#define OP_HANDLE(name, Sig)                                                                 \
  const c10::TypedOperatorHandle<Sig>& name##_op() {                                         \
    static const auto h =                                                                    \
        c10::Dispatcher::singleton().findSchemaOrThrow("pyformer::" #name, "").typed<Sig>(); \
    return h;                                                                                \
  }

using OptT = std::optional<at::Tensor>;
using T2 = std::tuple<at::Tensor, at::Tensor>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using T4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptD = std::optional<double>;
using ScaledQkSig = at::Tensor(const at::Tensor&, const at::Tensor&, OptD);
using MaskedSoftmaxSig = at::Tensor(const at::Tensor&, const OptT&, double, int64_t, const OptT&);
using LayerNormSig = T3(const at::Tensor&, c10::SymIntArrayRef, const OptT&, const OptT&, double);
using AddLayerNormSig = T4(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, const OptT&,
                           const OptT&, double);
using AttentionSig = T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, OptD,
                        int64_t, const OptT&, double, bool);
OP_HANDLE(scaled_qk, ScaledQkSig)
OP_HANDLE(masked_softmax, MaskedSoftmaxSig)
OP_HANDLE(layer_norm, LayerNormSig)
using RmsNormSig = T2(const at::Tensor&, c10::SymIntArrayRef, const OptT&, OptD);
using AddRmsNormSig = T3(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, const OptT&,
                         OptD);
using RotarySig = T2(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     bool);
using SwigluSig = at::Tensor(const at::Tensor&, const at::Tensor&);
OP_HANDLE(add_layer_norm, AddLayerNormSig)
OP_HANDLE(rms_norm, RmsNormSig)
OP_HANDLE(add_rms_norm, AddRmsNormSig)
OP_HANDLE(apply_rotary, RotarySig)
OP_HANDLE(swiglu, SwigluSig)
OP_HANDLE(attention, AttentionSig)

// ---- the fast entries: the arguments of torch.ops.pyformer.<op>, positional -------------------

// scaled_qk(q, k, scale) -> scores
PyObject* py_scaled_qk(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  const char* op = "scaled_qk";
  want_args(op, n, 3);
  const at::Tensor& q = tensor(op, "q", a[0]);
  const at::Tensor& k = tensor(op, "k", a[1]);
  const OptD scale = opt_real(op, "scale", a[2]);
  at::Tensor out;
  {
    ReleaseGil nogil;
    out = scaled_qk_op().call(q, k, scale);
  }
  return wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// masked_softmax(scores, mask, scale, causal, key_lengths) -> probs
PyObject* py_masked_softmax(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  const char* op = "masked_softmax";
  want_args(op, n, 5);
  const at::Tensor& scores = tensor(op, "scores", a[0]);
  const OptT mask = opt_tensor(op, "mask", a[1]);
  const double scale = real(op, "scale", a[2]);
  const int64_t causal = causal_code(op, a[3]);
  const OptT key_lengths = opt_tensor(op, "key_lengths", a[4]);
  at::Tensor out;
  {
    ReleaseGil nogil;
    out = masked_softmax_op().call(scores, mask, scale, causal, key_lengths);
  }
  return wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// layer_norm(x, normalized_shape, weight, bias, eps) -> y
PyObject* py_layer_norm(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  const char* op = "layer_norm";
  want_args(op, n, 5);
  const at::Tensor& x = tensor(op, "x", a[0]);
  const std::vector<int64_t> shape = int_list(op, "normalized_shape", a[1]);
  const OptT weight = opt_tensor(op, "weight", a[2]);
  const OptT bias = opt_tensor(op, "bias", a[3]);
  const double eps = real(op, "eps", a[4]);
  at::Tensor y;
  {
    ReleaseGil nogil;
    y = std::get<0>(layer_norm_op().call(x, c10::fromIntArrayRefSlow(shape), weight, bias, eps));
  }
  return wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// add_layer_norm(x, residual, normalized_shape, weight, bias, eps) -> (y, s)
PyObject* py_add_layer_norm(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  const char* op = "add_layer_norm";
  want_args(op, n, 6);
  const at::Tensor& x = tensor(op, "x", a[0]);
  const at::Tensor& residual = tensor(op, "residual", a[1]);
  const std::vector<int64_t> shape = int_list(op, "normalized_shape", a[2]);
  const OptT weight = opt_tensor(op, "weight", a[3]);
  const OptT bias = opt_tensor(op, "bias", a[4]);
  const double eps = real(op, "eps", a[5]);
  at::Tensor y, s;
  {
    ReleaseGil nogil;
    auto r =
        add_layer_norm_op().call(x, residual, c10::fromIntArrayRefSlow(shape), weight, bias, eps);
    y = std::move(std::get<0>(r));
    s = std::move(std::get<1>(r));
  }
  return pair(wrap(std::move(y)), wrap(std::move(s)));
  END_HANDLE_TH_ERRORS
}

// rms_norm(x, normalized_shape, weight, eps) -> y
PyObject* py_rms_norm(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  const char* op = "rms_norm";
  want_args(op, n, 4);
  const at::Tensor& x = tensor(op, "x", a[0]);
  const std::vector<int64_t> shape = int_list(op, "normalized_shape", a[1]);
  const OptT weight = opt_tensor(op, "weight", a[2]);
  const OptD eps = opt_real(op, "eps", a[3]);
  at::Tensor y;
  {
    ReleaseGil nogil;
    y = std::get<0>(rms_norm_op().call(x, c10::fromIntArrayRefSlow(shape), weight, eps));
  }
  return wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// add_rms_norm(x, residual, normalized_shape, weight, eps) -> (y, s)
PyObject* py_add_rms_norm(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  const char* op = "add_rms_norm";
  want_args(op, n, 5);
  const at::Tensor& x = tensor(op, "x", a[0]);
  const at::Tensor& residual = tensor(op, "residual", a[1]);
  const std::vector<int64_t> shape = int_list(op, "normalized_shape", a[2]);
  const OptT weight = opt_tensor(op, "weight", a[3]);
  const OptD eps = opt_real(op, "eps", a[4]);
  at::Tensor y, s;
  {
    ReleaseGil nogil;
    auto r = add_rms_norm_op().call(x, residual, c10::fromIntArrayRefSlow(shape), weight, eps);
    y = std::move(std::get<0>(r));
    s = std::move(std::get<1>(r));
  }
  return pair(wrap(std::move(y)), wrap(std::move(s)));
  END_HANDLE_TH_ERRORS
}

// apply_rotary(q, k, cos, sin, interleaved) -> (q_rot, k_rot)
PyObject* py_apply_rotary(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  const char* op = "apply_rotary";
  want_args(op, n, 5);
  const at::Tensor& q = tensor(op, "q", a[0]);
  const at::Tensor& k = tensor(op, "k", a[1]);
  const at::Tensor& cos = tensor(op, "cos", a[2]);
  const at::Tensor& sin = tensor(op, "sin", a[3]);
  const bool interleaved = boolean(op, "interleaved", a[4]);
  at::Tensor qr, kr;
  {
    ReleaseGil nogil;
    std::tie(qr, kr) = apply_rotary_op().call(q, k, cos, sin, interleaved);
  }
  return pair(wrap(std::move(qr)), wrap(std::move(kr)));
  END_HANDLE_TH_ERRORS
}

// swiglu(gate, up) -> out
PyObject* py_swiglu(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  const char* op = "swiglu";
  want_args(op, n, 2);
  const at::Tensor& gate = tensor(op, "gate", a[0]);
  const at::Tensor& up = tensor(op, "up", a[1]);
  at::Tensor out;
  {
    ReleaseGil nogil;
    out = swiglu_op().call(gate, up);
  }
  return wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// attention(q, k, v, mask, scale, causal, key_lengths, dropout_p, need_weights) -> (out, probs or
// None).
PyObject* py_attention(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  const char* op = "attention";
  want_args(op, n, 9);
  const at::Tensor& q = tensor(op, "q", a[0]);
  const at::Tensor& k = tensor(op, "k", a[1]);
  const at::Tensor& v = tensor(op, "v", a[2]);
  const OptT mask = opt_tensor(op, "mask", a[3]);
  const OptD scale = opt_real(op, "scale", a[4]);
  const int64_t causal = causal_code(op, a[5]);
  const OptT key_lengths = opt_tensor(op, "key_lengths", a[6]);
  const double dropout_p = real(op, "dropout_p", a[7]);
  const int need_weights = PyObject_IsTrue(a[8]);
  if (need_weights < 0) throw python_error();
  // the probabilities are asked for only when returned: autograd's kernel forms them itself
  // where its backward needs them (csrc/host/attention.cpp)
  const bool need_probs = need_weights;
  at::Tensor out, probs;
  {
    ReleaseGil nogil;
    auto r = attention_op().call(q, k, v, mask, scale, causal, key_lengths, dropout_p, need_probs);
    out = std::move(std::get<0>(r));
    probs = std::move(std::get<1>(r));
  }
  PyObject* weights = need_weights ? wrap(std::move(probs)) : (Py_INCREF(Py_None), Py_None);
  return pair(wrap(std::move(out)), weights);
  END_HANDLE_TH_ERRORS
}

// What the CPU kernels run on, set when the module loads (kernels::load_cpu_kernels).
std::string cpu_capability = "default", cpu_capability_note;

PyObject* build_info(PyObject*, PyObject*) {
#ifdef PYFORMER_WITH_CUDA
  PyObject* cuda = Py_True;
#else
  PyObject* cuda = Py_False;
#endif
  // the BLAS's mixed-precision GEMMs that the CPU flash kernel uses for float16/bfloat16
  const char* half_gemm = pyformer::cpu::half_gemm<c10::BFloat16>() ? "bf16" : "";
  return Py_BuildValue("{s:O,s:O,s:s,s:s,s:s,s:s}", "cpu", Py_True, "cuda", cuda, "cuda_archs",
                       PYFORMER_CUDA_ARCHS, "cpu_capability", cpu_capability.c_str(),
                       "cpu_capability_note", cpu_capability_note.c_str(), "cpu_half_gemm",
                       half_gemm);
}

// The AVX2 kernel library's path: this file's own, with "_C" replaced by "_cpu_avx2" (the two
// share the extension suffix, e.g. .cpython-311-x86_64-linux-gnu.so); "" when it is absent.
std::string avx2_library_path() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&avx2_library_path), &info) == 0 || !info.dli_fname) return "";
  std::string self = info.dli_fname;
  const size_t slash = self.rfind('/') + 1;  // 0 when there is none
  if (self.compare(slash, 3, "_C.") != 0) return "";
  std::string path = self.substr(0, slash) + "_cpu_avx2" + self.substr(slash + 2);
  return access(path.c_str(), R_OK) == 0 ? path : "";
}

#define FAST(name, doc)                                                                           \
  {#name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&py_##name)), METH_FASTCALL, \
   doc}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "What this build of pyformer._C holds: {'cpu', 'cuda', 'cuda_archs', 'cpu_capability', "
     "'cpu_capability_note', 'cpu_half_gemm'}."},
    FAST(scaled_qk, "scaled_qk(q, k, scale) -> scores"),
    FAST(masked_softmax, "masked_softmax(scores, mask, scale, causal, key_lengths) -> probs"),
    FAST(layer_norm, "layer_norm(x, normalized_shape, weight, bias, eps) -> y"),
    FAST(add_layer_norm,
         "add_layer_norm(x, residual, normalized_shape, weight, bias, eps) -> (y, s)"),
    FAST(rms_norm, "rms_norm(x, normalized_shape, weight, eps) -> y"),
    FAST(add_rms_norm, "add_rms_norm(x, residual, normalized_shape, weight, eps) -> (y, s)"),
    FAST(apply_rotary, "apply_rotary(q, k, cos, sin, interleaved) -> (q_rot, k_rot)"),
    FAST(swiglu, "swiglu(gate, up) -> out"),
    FAST(attention,
         "attention(q, k, v, mask, scale, causal, key_lengths, dropout_p, need_weights) -> "
         "(out, probs or None)"),
    {nullptr, nullptr, 0, nullptr}};

struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  try {
    cpu_capability = pyformer::kernels::load_cpu_kernels(avx2_library_path(), cpu_capability_note);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ImportError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  return PyModule_Create(&module);
}
