"""The project's compatibility fixes to Horovod 0.28.1's sdist.

Each fix is one exact text edit with the reason it is needed. A fix whose
``old`` text is not found exactly ``count`` times stops the build: the sdist
is pinned by hash, so a mismatch means the fix list itself is wrong.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Fix:
    path: str  # relative to the unpacked sdist
    old: str
    new: str
    why: str
    count: int = 1


@dataclass(frozen=True)
class NewFile:
    """A module added to the sdist; its text is a file beside this one."""
    path: str  # relative to the unpacked sdist; must not exist there
    source: str  # file name in hvdtrain/horovod_build/
    why: str

    @property
    def new(self) -> str:
        return (Path(__file__).parent / self.source).read_text()


BUILD_FIXES: tuple[Fix, ...] = (
    Fix(
        path="third_party/gloo/CMakeLists.txt",
        old="cmake_minimum_required(VERSION 2.8.12 FATAL_ERROR)",
        new="cmake_minimum_required(VERSION 3.5 FATAL_ERROR)",
        why="CMake >= 4 removed compatibility with versions < 3.5 and refuses "
            "gloo's old minimum; nothing in gloo relies on pre-3.5 policies.",
    ),
    Fix(
        path="third_party/flatbuffers/CMakeLists.txt",
        old="cmake_minimum_required(VERSION 2.8.12)",
        new="cmake_minimum_required(VERSION 3.5)",
        why="Same CMake >= 4 minimum-version refusal as gloo.",
    ),
    Fix(
        path="CMakeLists.txt",
        old="set(CMAKE_CXX_STANDARD 14)",
        new="set(CMAKE_CXX_STANDARD 17)",
        why="gloo and Horovod's core must share the C++ standard of the torch "
            "extension that links them: built as C++14, gloo's store.cc defines "
            "Store::kDefaultTimeout out of line while C++17 code emits it inline, "
            "and the link fails with a multiple definition.",
    ),
    Fix(
        path="horovod/torch/CMakeLists.txt",
        old='if(NOT Pytorch_VERSION VERSION_LESS "1.5.0")\n    set(CMAKE_CXX_STANDARD 14)\nendif()',
        new='if(NOT Pytorch_VERSION VERSION_LESS "2.1.0")\n    set(CMAKE_CXX_STANDARD 17)\n'
            'elseif(NOT Pytorch_VERSION VERSION_LESS "1.5.0")\n    set(CMAKE_CXX_STANDARD 14)\nendif()',
        why="PyTorch >= 2.1 headers require C++17; Horovod asks for C++14.",
    ),
    Fix(
        path="horovod/common/group_table.h",
        old="#include <mutex>\n#include <queue>\n",
        new="#include <mutex>\n#include <queue>\n#include <string>\n",
        why="GCC >= 13 no longer includes <string> through other standard headers; "
            "group_table.h uses std::string without including it.",
    ),
    Fix(
        path="horovod/common/common.h",
        old="#include <memory>\n#include <string>\n",
        new="#include <memory>\n#include <stdexcept>\n#include <string>\n",
        why="GCC >= 13: common.h throws std::logic_error without including <stdexcept>.",
    ),
    Fix(
        path="horovod/tensorflow/CMakeLists.txt",
        old='list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")',
        new='if(EXISTS "${Tensorflow_INCLUDE_DIRS}/highwayhash")\n'
            '    list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")\n'
            'else()\n'
            '    message(STATUS "TensorFlow ships no highwayhash headers: building without the optional XLA ops")\n'
            'endif()',
        why="TensorFlow >= 2.16 ships no highwayhash headers, which xla_mpi_ops.cc "
            "includes; the XLA ops are optional, so they are built only where possible.",
    ),
    Fix(
        path="horovod/common/ops/cuda/CMakeLists.txt",
        old="set(CMAKE_CUDA_STANDARD 11)\n",
        new="if(CMAKE_CXX_COMPILER_ID MATCHES GNU AND CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 14)\n"
            "    set(CMAKE_CUDA_STANDARD 14)\n"
            "else()\n"
            "    set(CMAKE_CUDA_STANDARD 11)\n"
            "endif()\n",
        why="Upstream pull request #4313: GCC >= 14's standard headers do not compile as "
            "C++11 under nvcc, so the CUDA kernels of a GPU build are compiled as C++14 there.",
    ),
)

# A model in channels-last memory order (torch.channels_last, the fast layout for
# convolutions on GPUs) has parameters and gradients that are dense but not
# "contiguous" in torch's default sense, and Horovod refused every one of them.
# Allreduce and broadcast work element by element on the tensor's memory as one
# block, which is right for any gap-free layout that all ranks share (a model's
# parameters and their gradients do); their outputs now take the input's layout.
# Allgather, alltoall and reducescatter concatenate or split along the first
# dimension and keep the strict check.
_MPI_OPS = "horovod/torch/mpi_ops.py"
CHANNELS_LAST_FIXES: tuple[Fix, ...] = (
    Fix(
        path=_MPI_OPS,
        old="def _check_function(function_factory, tensor):\n"
            "    function = function_factory(tensor)\n"
            "    if not hasattr(mpi_lib, function):\n"
            "        raise ValueError('Tensor type %s is not supported.' % tensor.type())\n"
            "    if not tensor.is_contiguous():\n",
        new="def _dense(tensor):\n"
            "    return any(tensor.is_contiguous(memory_format=layout)\n"
            "               for layout in (torch.channels_last, torch.channels_last_3d))\n"
            "\n\n"
            "def _check_function(function_factory, tensor, elementwise=False):\n"
            "    function = function_factory(tensor)\n"
            "    if not hasattr(mpi_lib, function):\n"
            "        raise ValueError('Tensor type %s is not supported.' % tensor.type())\n"
            "    if not (tensor.is_contiguous() or elementwise and _dense(tensor)):\n",
        why="Let allreduce and broadcast take channels-last tensors (elementwise=True).",
    ),
    Fix(
        path=_MPI_OPS,
        old="    function = _check_function(_allreduce_function_factory, tensor)\n",
        new="    function = _check_function(_allreduce_function_factory, tensor, elementwise=True)\n",
        why="Allreduce is elementwise.",
    ),
    Fix(
        path=_MPI_OPS,
        old="    function = _check_function(_grouped_allreduce_function_factory, tensors[0])\n",
        new="    function = _check_function(_grouped_allreduce_function_factory, tensors[0], elementwise=True)\n"
            "    for other in tensors[1:]:\n"
            "        _check_function(_grouped_allreduce_function_factory, other, elementwise=True)\n",
        why="Grouped allreduce is elementwise; every tensor of the group is checked, not the "
            "first alone (a strided one among the others was reduced as if it were dense).",
    ),
    Fix(
        path=_MPI_OPS,
        old="    function = _check_function(_broadcast_function_factory, tensor)\n",
        new="    function = _check_function(_broadcast_function_factory, tensor, elementwise=True)\n",
        why="Broadcast copies the tensor's memory as one block.",
    ),
    Fix(
        path=_MPI_OPS,
        old="    output = tensor.new(tensor.shape)\n",
        new="    output = torch.empty_like(tensor)\n",
        count=2,
        why="allreduce_async and broadcast_async: the output takes the input's memory layout; "
            "a default-layout output would hold a channels-last input's values permuted.",
    ),
    Fix(
        path=_MPI_OPS,
        old="    outputs = [t.new(t.shape) for t in tensors]\n",
        new="    outputs = [torch.empty_like(t) for t in tensors]\n",
        why="grouped_allreduce_async: the same for each output.",
    ),
)

# hvd.synchronize() (every DistributedOptimizer step waits in it) spun on the
# handle: a loop of PollHandle and std::this_thread::yield, one core at 100 %
# while the allreduce runs. Where ranks share a machine's cores (CPU training),
# that core is taken from Gloo's transport thread and reduction and from
# Horovod's background thread. The wait now sleeps on a condition variable that
# MarkDone (and Reset, which drops every handle) signals.
_HANDLES = "horovod/torch/handle_manager"
BLOCKING_WAIT_FIXES: tuple[Fix, ...] = (
    Fix(
        path=_HANDLES + ".h",
        old="#include <atomic>\n",
        new="#include <atomic>\n#include <condition_variable>\n",
        why="The waiting thread sleeps on a condition variable.",
    ),
    Fix(
        path=_HANDLES + ".h",
        old="  bool PollHandle(int handle);\n",
        new="  bool PollHandle(int handle);\n"
            "  // Blocks until the handle is done; throws if it does not exist (or is reset).\n"
            "  void WaitHandle(int handle);\n",
        why="A blocking wait beside the poll.",
    ),
    Fix(
        path=_HANDLES + ".h",
        old="  std::mutex mutex_;\n",
        new="  std::mutex mutex_;\n  std::condition_variable done_;\n",
        why="Signalled when a handle is marked done or the handles are reset.",
    ),
    Fix(
        path=_HANDLES + ".cc",
        old="  std::lock_guard<std::mutex> guard(mutex_);\n"
            "  results_[handle] = std::make_shared<Status>(status);\n}\n",
        new="  {\n"
            "    std::lock_guard<std::mutex> guard(mutex_);\n"
            "    results_[handle] = std::make_shared<Status>(status);\n"
            "  }\n"
            "  done_.notify_all();\n}\n\n"
            "void HandleManager::WaitHandle(int handle) {\n"
            "  std::unique_lock<std::mutex> lock(mutex_);\n"
            "  done_.wait(lock, [&] {\n"
            "    auto found = results_.find(handle);\n"
            "    if (found == results_.end()) {\n"
            "      throw std::invalid_argument(\"Handle \" + std::to_string(handle) +\n"
            "                                  \" was not created or has been cleared.\");\n"
            "    }\n"
            "    return found->second != nullptr;\n"
            "  });\n}\n",
        why="MarkDone wakes the waiters; WaitHandle sleeps until its handle is done.",
    ),
    Fix(
        path=_HANDLES + ".cc",
        old="  results_.clear();\n  last_handle_ = 0;\n}\n",
        new="  results_.clear();\n  last_handle_ = 0;\n  done_.notify_all();\n}\n",
        why="A reset (elastic) wakes the waiters, whose handles are gone: they raise.",
    ),
    Fix(
        path="horovod/torch/mpi_ops_v2.cc",
        old="  while (true) {\n"
            "    if (handle_manager.PollHandle(handle)) break;\n"
            "    {\n"
            "      py::gil_scoped_release release_python_gil;\n"
            "      std::this_thread::yield();\n"
            "    }\n"
            "  }\n",
        new="  {\n"
            "    py::gil_scoped_release release_python_gil;\n"
            "    handle_manager.WaitHandle(handle);\n"
            "  }\n",
        why="WaitAndClear sleeps until the handle is done instead of spinning a core.",
    ),
)

# Horovod's background thread coordinates with the other ranks once every cycle time
# (1 ms), whether or not this process has anything to reduce: on CPU ranks that share a
# machine's cores, a thousand empty negotiations a second take a core's share from the
# ranks' compute, and the first tensor of a step waits for the next cycle. While no
# collective of this process is outstanding (its tensor table is empty), the thread now
# sleeps until one is enqueued (or IDLE_WAIT_MS passes: shutdown and the stall check
# still run), and the first tensor starts a cycle at once. A rank with a collective
# outstanding cycles as before, so a negotiation waiting on it is not delayed; a rank
# that has joined holds its join tensor and cycles as before too.
IDLE_WAIT_MS = 20
_QUEUE = "horovod/common/tensor_queue"
IDLE_WAIT_FIXES: tuple[Fix, ...] = (
    Fix(
        path=_QUEUE + ".h",
        old="#include <mutex>\n",
        new="#include <chrono>\n#include <condition_variable>\n#include <mutex>\n",
        why="The background thread sleeps on a condition variable while idle.",
    ),
    Fix(
        path=_QUEUE + ".h",
        old="  void RemoveJoinTensor();\n",
        new="  void RemoveJoinTensor();\n\n"
            "  // Sleeps while no tensor is outstanding, until one is enqueued or `until`.\n"
            "  void WaitWhileIdle(std::chrono::steady_clock::time_point until);\n",
        why="The idle wait, beside the queue it waits on.",
    ),
    Fix(
        path=_QUEUE + ".h",
        old="  mutable std::mutex mutex_;\n",
        new="  mutable std::mutex mutex_;\n\n"
            "  // Signalled when a tensor is enqueued.\n"
            "  std::condition_variable enqueued_;\n",
        why="Signalled by AddToTensorQueue and AddToTensorQueueMulti.",
    ),
    Fix(
        path=_QUEUE + ".cc",
        old="  message_queue_.push(std::move(message));\n  return Status::OK();\n}\n",
        new="  message_queue_.push(std::move(message));\n"
            "  enqueued_.notify_one();\n"
            "  return Status::OK();\n}\n\n"
            "void TensorQueue::WaitWhileIdle(std::chrono::steady_clock::time_point until) {\n"
            "  std::unique_lock<std::mutex> lock(mutex_);\n"
            "  enqueued_.wait_until(lock, until, [this] { return !tensor_table_.empty(); });\n"
            "}\n",
        why="An enqueued tensor wakes the idle background thread.",
    ),
    Fix(
        path=_QUEUE + ".cc",
        old="    message_queue_.push(std::move(messages[i]));\n  }\n  return Status::OK();\n",
        new="    message_queue_.push(std::move(messages[i]));\n  }\n"
            "  enqueued_.notify_one();\n  return Status::OK();\n",
        why="A grouped enqueue wakes it too.",
    ),
    Fix(
        path="horovod/common/operations.cc",
        old="    std::this_thread::sleep_for(sleep_duration);\n  }\n"
            "  state.last_cycle_start = std::chrono::steady_clock::now();\n",
        new="    std::this_thread::sleep_for(sleep_duration);\n  }\n"
            "  if (!state.dynamic_process_sets && !state.shut_down &&\n"
            "      state.process_set_table.Ids().size() == 1) {\n"
            "    state.process_set_table.Get(0).tensor_queue.WaitWhileIdle(\n"
            f"        std::chrono::steady_clock::now() + std::chrono::milliseconds({IDLE_WAIT_MS}));\n"
            "  }\n"
            "  state.last_cycle_start = std::chrono::steady_clock::now();\n",
        why="No empty negotiation every cycle time while this process has nothing outstanding; "
            "the first tensor after a pause starts a cycle at once.",
    ),
)

# Horovod's own bugs that hvdtrain's features run into.
RUNTIME_FIXES: tuple[Fix, ...] = (
    Fix(
        path="horovod/common/parameter_manager.cc",
        old="  } else {\n    Eigen::VectorXd v = TunableParameter::BestValue();\n",
        new="  } else if (fixed_values_.find(variable) != fixed_values_.end()) {\n"
            "    // Fixed earlier (before an elastic re-init): the variable has no slot left in\n"
            "    // the tuned vector, and a fixed value is not replaced by a default.\n"
            "    return;\n"
            "  } else {\n    Eigen::VectorXd v = TunableParameter::BestValue();\n",
        why="Every hvd.init() sets the fusion threshold and cycle time to their defaults "
            "(not fixed) before applying HOROVOD_FUSION_THRESHOLD / HOROVOD_CYCLE_TIME "
            "(fixed). A fixed variable is removed from the tuned vector, and the parameter "
            "manager outlives shutdown, so the default set of a re-init (elastic reset) "
            "wrote past the vector's end: SIGSEGV with both variables set, another "
            "variable silently overwritten with one.",
    ),
    Fix(
        path="horovod/common/util.py",
        old="EXTENSIONS = ['tensorflow', 'torch', 'mxnet']\n",
        new="EXTENSIONS = ['torch', 'tensorflow', 'mxnet']\n",
        why="horovodrun checks that Horovod was built with Gloo (or MPI) before every launch, by "
            "importing each framework's extension in a child process in this order until one "
            "answers. TensorFlow came first, and importing it took 3.4 s of each launch where "
            "torch takes 1.2 s; a machine without torch answers from TensorFlow as before.",
    ),
) + CHANNELS_LAST_FIXES + BLOCKING_WAIT_FIXES + IDLE_WAIT_FIXES

# Horovod's Gloo rendezvous is a plain HTTP key-value store: anyone who can reach its port
# can read, overwrite or delete the ranks' addresses and stall or poison a job's start.
# With HOROVOD_GLOO_RENDEZVOUS_SECRET set, every request the ranks send is signed with an
# HMAC-SHA256 of the job's secret (as Horovod's driver services sign their messages), and a
# server that knows the secret (hvdtrain's, under srun) refuses the rest. Without the
# variable the requests are as before.
_STORE = "horovod/common/gloo/http_store"

# Keras 2 through tf-keras (TF_USE_LEGACY_KERAS=1: tf.keras is the tf_keras package): the
# Keras modules took their backend from the standalone `keras` package, which is Keras 3
# beside TensorFlow 2.21, while the model, optimizers and variables are tf_keras's. The
# backend now follows tf.keras in that mode, and is unchanged otherwise.
_K_OLD = ('if is_version_greater_equal_than(tf.__version__, "2.6.0"):\n'
          "    from keras import backend as K\n")
_K_NEW = ("# Keras 2 (tf-keras under TF_USE_LEGACY_KERAS=1 has no __version__; Keras 3's tf.keras has)\n"
          'if int(str(getattr(keras, "__version__", "2")).split(".")[0]) < 3:\n'
          "    K = keras.backend\n"
          'elif is_version_greater_equal_than(tf.__version__, "2.6.0"):\n'
          "    from keras import backend as K\n")
KERAS2_FIXES: tuple[Fix, ...] = tuple(
    Fix(path=path, old=_K_OLD, new=_K_NEW,
        why="Keras 2 mode: the learning-rate callbacks read and set a tf_keras optimizer's lr "
            "through Keras 3's backend (no get_value): Horovod's test_train_model_lr_schedule "
            "failed under TF_USE_LEGACY_KERAS=1.")
    for path in ("horovod/tensorflow/keras/__init__.py", "horovod/tensorflow/keras/callbacks.py"))

RENDEZVOUS_FIXES: tuple[Fix | NewFile, ...] = (
    NewFile(
        path="horovod/common/gloo/rendezvous_signature.h",
        source="rendezvous_signature.h",
        why="SHA-256 and HMAC for the signature header (no crypto library is linked).",
    ),
    Fix(
        path=_STORE + ".h",
        old="  http::Response PerformHTTP(http::Request& request, const std::string& method,\n"
            "                             const std::string& body);\n",
        new="  http::Response PerformHTTP(http::Request& request, const std::string& method,\n"
            "                             const std::string& body, const std::string& url);\n",
        why="The request's URL is signed with its method and body.",
    ),
    Fix(
        path=_STORE + ".cc",
        old='#include "../logging.h"\n',
        new='#include "../logging.h"\n#include "rendezvous_signature.h"\n',
        why="The signature helper.",
    ),
    Fix(
        path=_STORE + ".cc",
        old="                       const std::string& method = HTTP_GET_METHOD,\n"
            "                       const std::string& body = \"\") {\n"
            "  for (int retry_cnt = 0; retry_cnt < MAX_RETRY_TIMES; ++retry_cnt) {\n"
            "    try {\n"
            "      http::Response response = request.send(method, body);\n",
        new="                       const std::string& method,\n"
            "                       const std::string& body, const std::string& url) {\n"
            "  const std::vector<std::string> headers = rendezvous_signature::headers(method, url, body);\n"
            "  for (int retry_cnt = 0; retry_cnt < MAX_RETRY_TIMES; ++retry_cnt) {\n"
            "    try {\n"
            "      http::Response response = request.send(method, body, headers);\n",
        why="Every request carries the job's signature when it has a secret.",
    ),
    Fix(
        path=_STORE + ".cc",
        old="PerformHTTP(request, HTTP_GET_METHOD);",
        new="PerformHTTP(request, HTTP_GET_METHOD, \"\", url);",
        why="GET signed.",
    ),
    Fix(
        path=_STORE + ".cc",
        old="PerformHTTP(request, HTTP_PUT_METHOD, body);",
        new="PerformHTTP(request, HTTP_PUT_METHOD, body, url);",
        why="PUT signed, with its body.",
    ),
    Fix(
        path=_STORE + ".cc",
        old="PerformHTTP(request, HTTP_DELETE_METHOD);",
        new="PerformHTTP(request, HTTP_DELETE_METHOD, \"\", url);",
        why="DELETE signed.",
    ),
)

# Keras 3 (TensorFlow >= 2.16) variables are not tf.Variable objects: they wrap
# one (``.value``) and lack its API (``ref()``, ...). Horovod's TensorFlow code
# therefore works on the wrapped variable, reached through one helper, and
# accepts Keras 3's changed BatchNormalization and optimizer APIs.
_TF = "horovod/tensorflow/"
KERAS3_FIXES: tuple[Fix, ...] = (
    Fix(
        path=_TF + "util.py",
        old="def vars_to_refs(vars):\n"
            "    if isinstance(vars, list):\n"
            "        return tuple(vars_to_refs(v) for v in vars)\n"
            "    return vars.ref()\n",
        new="def _tf_variable(var):\n"
            "    # Keras 3 variables wrap a tf.Variable in `.value` and have no `ref()`.\n"
            "    if not isinstance(var, tf.Variable) and isinstance(getattr(var, 'value', None), tf.Variable):\n"
            "        return var.value\n"
            "    return var\n\n\n"
            "def _tf_variables(variables):\n"
            "    if isinstance(variables, (list, tuple)):\n"
            "        return [_tf_variable(v) for v in variables]\n"
            "    return variables\n\n\n"
            "def vars_to_refs(vars):\n"
            "    if isinstance(vars, list):\n"
            "        return tuple(vars_to_refs(v) for v in vars)\n"
            "    return _tf_variable(vars).ref()\n",
        why="Keras 3 variables have no ref(): add the helper that unwraps them to "
            "their tf.Variable, and use it for the `groups` of gradient tapes.",
    ),
    Fix(
        path=_TF + "__init__.py",
        old="from horovod.tensorflow.util import _executing_eagerly, _make_subgraph, _cache, "
            "vars_to_refs, refs_to_vars\n",
        new="from horovod.tensorflow.util import _executing_eagerly, _make_subgraph, _cache, "
            "vars_to_refs, refs_to_vars\n"
            "from horovod.tensorflow.util import _tf_variable, _tf_variables\n",
        why="Import the Keras 3 unwrapping helpers.",
    ),
    Fix(
        path=_TF + "__init__.py",
        old="                self._local_sources.add(source.ref())\n",
        new="                self._local_sources.add(_tf_variable(source).ref())\n",
        why="register_local_source (and PartialDistributedGradientTape's local "
            "layers) failed on Keras 3 variables.",
    ),
    Fix(
        path=_TF + "__init__.py",
        old="        def gradient(self, target, sources, output_gradients=None, use_generic_names=False):\n"
            "            gradients = super(self.__class__, self).gradient(target, sources, output_gradients)\n",
        new="        def gradient(self, target, sources, output_gradients=None, use_generic_names=False):\n"
            "            sources = _tf_variables(sources)  # Keras 3 variables -> tf.Variable\n"
            "            gradients = super(self.__class__, self).gradient(target, sources, output_gradients)\n",
        why="DistributedGradientTape.gradient(loss, model.trainable_variables) failed "
            "on Keras 3 variables; the tape records reads of the wrapped tf.Variable, "
            "so the gradients are the same.",
    ),
    Fix(
        path=_TF + "__init__.py",
        old="                is_local_source = s.ref() in self._local_sources if _IS_TF2",
        new="                is_local_source = _tf_variable(s).ref() in self._local_sources if _IS_TF2",
        why="get_local_and_global_gradients failed on Keras 3 variables; the pairs "
            "it returns keep the caller's own variables.",
    ),
    Fix(
        path=_TF + "functions.py",
        old="from horovod.tensorflow.util import _cache, _executing_eagerly, _make_subgraph\n",
        new="from horovod.tensorflow.util import _cache, _executing_eagerly, _make_subgraph, _tf_variables\n",
        why="Import the Keras 3 unwrapping helper.",
    ),
    Fix(
        path=_TF + "functions.py",
        old="    if inplace:\n        vars_by_device = {}\n",
        new="    variables = _tf_variables(list(variables))  # Keras 3 variables -> tf.Variable\n"
            "    if inplace:\n        vars_by_device = {}\n",
        why="broadcast_variables of a Keras 3 model's or optimizer's variables "
            "failed; the broadcast assigns the wrapped tf.Variable.",
    ),
    Fix(
        path=_TF + "sync_batch_norm.py",
        old="from horovod.tensorflow.mpi_ops import Sum\n",
        new="from horovod.tensorflow.mpi_ops import Sum\n\n"
            "import inspect\n"
            "# Keras 2's BatchNormalization takes `fused=`; Keras 3's rejects it.\n"
            "_ACCEPTS_FUSED = 'fused' in inspect.signature(tf.keras.layers.BatchNormalization.__init__).parameters\n",
        why="Detect whether BatchNormalization takes `fused` (Keras 2) or not (Keras 3).",
    ),
    Fix(
        path=_TF + "sync_batch_norm.py",
        old="    super(SyncBatchNormalization, self).__init__(fused=fused, **kwargs)\n",
        new="    if _ACCEPTS_FUSED:\n"
            "      kwargs['fused'] = fused\n"
            "    super(SyncBatchNormalization, self).__init__(**kwargs)\n",
        why="Keras 3's BatchNormalization has no `fused` argument and rejects it.",
    ),
    Fix(
        path=_TF + "sync_batch_norm.py",
        old="  def _moments(self, inputs, reduction_axes, keep_dims, **kwargs):\n"
            '    """Compute the mean and variance: it overrides the original _moments."""\n'
            "    worker_mean, worker_variance = super(SyncBatchNormalization, self)._moments(\n"
            "      inputs, reduction_axes, keep_dims=keep_dims, **kwargs)\n",
        new="  def _moments(self, inputs, *args, **kwargs):\n"
            '    """Compute the mean and variance: it overrides the original _moments."""\n'
            "    # Keras 2 calls _moments(inputs, reduction_axes, keep_dims); Keras 3 _moments(inputs, mask).\n"
            "    worker_mean, worker_variance = super(SyncBatchNormalization, self)._moments(\n"
            "      inputs, *args, **kwargs)\n",
        why="Keras 3 calls _moments(inputs, mask): pass on whatever arguments the "
            "installed Keras uses.",
    ),
    Fix(
        path=_TF + "sync_batch_norm.py",
        old="  def call(self, *args, **kwargs):\n"
            "    outputs = super(SyncBatchNormalization, self).call(*args, **kwargs)\n",
        new="  def call(self, inputs, training=None, **kwargs):\n"
            "    # Keras 3 reads call's signature: build() gets the shape of the named first\n"
            "    # argument, and `training` is passed only to a call that names it.\n"
            "    outputs = super(SyncBatchNormalization, self).call(inputs, training=training, **kwargs)\n",
        why="Keras 3 builds a layer from the shape of call's named first argument and "
            "passes `training` only when call names it; with *args, **kwargs the layer "
            "was built with no shape and never used batch statistics.",
    ),
    Fix(
        path=_TF + "elastic.py",
        old="def _global_variables():\n",
        new="def _optimizer_variables(optimizer):\n"
            "    # Keras 2: optimizer.variables(); Keras 3: optimizer.variables is a list.\n"
            "    variables = optimizer.variables\n"
            "    return variables() if callable(variables) else variables\n\n\n"
            "def _global_variables():\n",
        why="Keras 3 optimizers expose `variables` as a list, not a method.",
    ),
    Fix(
        path=_TF + "elastic.py",
        old="broadcast_variables(optimizer.variables(), root_rank=0)",
        new="broadcast_variables(_optimizer_variables(optimizer), root_rank=0)",
        why="TensorFlowKerasState's broadcast of a Keras 3 optimizer.",
    ),
    Fix(
        path=_TF + "elastic.py",
        old="self.optimizer.variables()",
        new="_optimizer_variables(self.optimizer)",
        why="TensorFlowKerasState's save and restore of a Keras 3 optimizer.",
        count=3,
    ),
)

# horovod.tensorflow.keras (model.fit with DistributedOptimizer and Horovod's callbacks)
# on Keras 3: the optimizer is a new module (keras3.py beside this file); the callbacks
# take Keras 3 variables, optimizers without an `lr` alias, and keep working without
# Keras 2's backend functions.
_KERAS = "horovod/_keras/"
KERAS3_KERAS_FIXES: tuple[Fix | NewFile, ...] = (
    NewFile(
        path=_KERAS + "keras3.py",
        source="keras3.py",
        why="Keras 3's model.fit passes its own tape's gradients to optimizer.apply(); "
            "Keras 3 optimizers have no compute_gradients/get_gradients, where Horovod "
            "allreduced on Keras 2. The new module's DistributedOptimizer allreduces in "
            "apply(), keeps Keras 2's _compute_gradients/minimize, and runs "
            "backward_passes_per_step through Horovod's eager aggregation helper.",
    ),
    Fix(
        path=_KERAS + "__init__.py",
        old="    class _DistributedOptimizer(*optimizer.__class__.__bases__):\n"
            "        _HAS_AGGREGATE_GRAD = True\n",
        new="    from horovod._keras import keras3\n"
            "    if keras3.is_keras3_optimizer(optimizer):\n"
            "        return keras3.create_distributed_optimizer(\n"
            "            optimizer, name, device_dense, device_sparse, compression, sparse_as_dense,\n"
            "            gradient_predivide_factor, op, backward_passes_per_step,\n"
            "            average_aggregated_gradients, groups, process_set, scale_local_gradients)\n\n"
            "    class _DistributedOptimizer(*optimizer.__class__.__bases__):\n"
            "        _HAS_AGGREGATE_GRAD = True\n",
        why="hvd.DistributedOptimizer(keras3_optimizer) failed in Keras 2's code path "
            "(compute_gradients, variables()): Keras 3 optimizers go to keras3.py.",
    ),
    Fix(
        path=_KERAS + "callbacks.py",
        old="import horovod.tensorflow as hvd\nimport tensorflow as tf\n",
        new="import horovod.tensorflow as hvd\nimport tensorflow as tf\n"
            "from horovod.tensorflow.elastic import _optimizer_variables  # added above for Keras 3\n"
            "from horovod.tensorflow.util import _tf_variable\n\n\n"
            "def _get_lr(backend, optimizer):\n"
            "    # Keras 3 optimizers have no `lr` alias, and Keras 3 variables no dtype.name\n"
            "    # for the legacy backend's get_value / set_value.\n"
            "    if hasattr(optimizer, 'lr'):\n"
            "        return backend.get_value(optimizer.lr)\n"
            "    return float(tf.convert_to_tensor(optimizer.learning_rate).numpy())\n\n\n"
            "def _set_lr(backend, optimizer, value):\n"
            "    if hasattr(optimizer, 'lr'):\n"
            "        backend.set_value(optimizer.lr, value)\n"
            "    else:\n"
            "        optimizer.learning_rate = value\n\n\n"
            "_MOMENTUM_WARNED = []\n\n\n"
            "def _momentum_adjustable(optimizer):\n"
            "    # Keras 2 keeps momentum in a variable; Keras 3 in a Python float that a\n"
            "    # compiled train step has read once, so a new value would not be used.\n"
            "    if not hasattr(optimizer, 'momentum'):\n"
            "        return False\n"
            "    if hasattr(optimizer, 'lr'):  # Keras 2\n"
            "        return True\n"
            "    if optimizer.momentum and not _MOMENTUM_WARNED:\n"
            "        _MOMENTUM_WARNED.append(True)\n"
            "        warnings.warn('momentum_correction: a Keras 3 optimizer keeps momentum in a Python '\n"
            "                      'float that a compiled train step does not re-read; momentum is not '\n"
            "                      'corrected while the learning rate changes')\n"
            "    return False\n",
        why="Helpers for the callbacks on Keras 3 (and the elastic module's and util's "
            "unwrapping ones): its variables wrap a tf.Variable, its optimizers expose "
            "`variables` as a list and have no `lr`, and its momentum is a Python float "
            "compiled into the train step.",
    ),
    Fix(
        path=_KERAS + "callbacks.py",
        old="        self._local_vars.add(var.ref())\n",
        new="        self._local_vars.add(_tf_variable(var).ref())\n",
        why="BroadcastGlobalVariablesCallback(local_variables=...) failed on Keras 3 "
            "variables (no ref()).",
    ),
    Fix(
        path=_KERAS + "callbacks.py",
        old="                broadcast_vars = [var for var in self.model.variables if var.ref() not in self._local_vars]\n"
            "                hvd.broadcast_variables(broadcast_vars,\n"
            "                                        root_rank=self.root_rank)\n"
            "                hvd.broadcast_variables(self.model.optimizer.variables(),\n",
        new="                broadcast_vars = [var for var in self.model.variables\n"
            "                                  if _tf_variable(var).ref() not in self._local_vars]\n"
            "                hvd.broadcast_variables(broadcast_vars,\n"
            "                                        root_rank=self.root_rank)\n"
            "                hvd.broadcast_variables(_optimizer_variables(self.model.optimizer),\n",
        why="BroadcastGlobalVariablesCallback failed after the first batch on Keras 3: "
            "ref() on its variables, optimizer.variables() on its optimizers.",
    ),
    Fix(
        path=_KERAS + "callbacks.py",
        old="                    hvd.allreduce(self.backend.constant(value, name=metric)).numpy()\n",
        new="                    hvd.allreduce(tf.constant(value, name=metric)).numpy()\n",
        why="MetricAverageCallback: Keras 3's keras.backend has no constant().",
    ),
    Fix(
        path=_KERAS + "callbacks.py",
        old="        old_lr = self.backend.get_value(self.model.optimizer.lr)\n"
            "        new_lr = self.initial_lr * self.multiplier(epoch)\n"
            "        self.backend.set_value(self.model.optimizer.lr, new_lr)\n\n"
            "        if hasattr(self.model.optimizer, 'momentum') and self.momentum_correction:\n",
        new="        old_lr = _get_lr(self.backend, self.model.optimizer)\n"
            "        new_lr = self.initial_lr * self.multiplier(epoch)\n"
            "        _set_lr(self.backend, self.model.optimizer, new_lr)\n\n"
            "        if self.momentum_correction and _momentum_adjustable(self.model.optimizer):\n",
        why="LearningRateScheduleCallback / LearningRateWarmupCallback on Keras 3 "
            "optimizers (no `lr`; momentum a Python float).",
    ),
    Fix(
        path=_KERAS + "callbacks.py",
        old="self.backend.get_value(self.model.optimizer.lr)",
        new="_get_lr(self.backend, self.model.optimizer)",
        why="The learning rate read at train begin, logged at epoch end, and printed "
            "after warmup, on Keras 3 optimizers.",
        count=3,
    ),
    Fix(
        path="horovod/tensorflow/keras/callbacks.py",
        old="        elif isinstance(local_variables, tf.Variable):\n"
            "            local_variables = [local_variables]\n"
            "        elif not all(isinstance(var, tf.Variable) for var in local_variables):\n",
        new="        elif isinstance(_tf_variable(local_variables), tf.Variable):\n"
            "            local_variables = [local_variables]\n"
            "        elif not all(isinstance(_tf_variable(var), tf.Variable) for var in local_variables):\n",
        why="BroadcastGlobalVariablesCallback rejected Keras 3 variables as local_variables.",
    ),
    Fix(
        path="horovod/tensorflow/keras/callbacks.py",
        old="from horovod._keras import callbacks as _impl\n",
        new="from horovod._keras import callbacks as _impl\n"
            "from horovod.tensorflow.util import _tf_variable\n",
        why="Import the Keras 3 unwrapping helper.",
    ),
    Fix(
        path=_KERAS + "__init__.py",
        old="    return keras.models.load_model(filepath, custom_objects=horovod_objects)\n",
        new="    from horovod._keras import keras3\n"
            "    if keras3.is_keras3(keras):\n"
            "        return keras3.load_model(keras, wrap_optimizer, filepath, custom_objects)\n"
            "    return keras.models.load_model(filepath, custom_objects=horovod_objects)\n",
        why="hvd.load_model on Keras 3 returned the model with a plain optimizer: Keras 3 "
            "restores an optimizer by its registered class and never looks up the lowercase "
            "names Horovod maps to wrapped classes, so training went on without allreduce. "
            "keras3.load_model loads as saved, then wraps the restored optimizer, state kept.",
    ),
)

FIXES = BUILD_FIXES + RUNTIME_FIXES + RENDEZVOUS_FIXES + KERAS3_FIXES + KERAS3_KERAS_FIXES + KERAS2_FIXES


def fixes_digest(fixes: tuple[Fix | NewFile, ...] = FIXES) -> str:
    """A short hash of the fix list (and the added files' text): part of the wheel cache key."""
    payload = json.dumps([asdict(f) | {"new": f.new} for f in fixes], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:12]


class FixError(RuntimeError):
    pass


def apply_fixes(source_root: Path, fixes: tuple[Fix | NewFile, ...] = FIXES) -> list[str]:
    """Apply every fix in place; return one line per fix for the build log."""
    applied = []
    for fix in fixes:
        target = source_root / fix.path
        if isinstance(fix, NewFile):
            if target.exists():
                raise FixError(f"{fix.path} already exists in the sdist: the added module would replace it")
            target.write_text(fix.new)
            applied.append(f"{fix.path} (added): {fix.why}")
            continue
        if not target.is_file():
            raise FixError(f"fix target {fix.path} is missing from the sdist")
        text = target.read_text()
        found = text.count(fix.old)
        if found != fix.count:
            raise FixError(
                f"fix for {fix.path} expected its text {fix.count} time(s), found {found}: "
                f"the sdist differs from the one the fixes were written for")
        target.write_text(text.replace(fix.old, fix.new))
        applied.append(f"{fix.path}: {fix.why}")
    return applied
