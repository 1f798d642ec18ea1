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

FIXES = BUILD_FIXES + RUNTIME_FIXES + KERAS3_FIXES


def fixes_digest(fixes: tuple[Fix, ...] = FIXES) -> str:
    """A short hash of the fix list: part of the wheel cache key."""
    payload = json.dumps([asdict(f) for f in fixes], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:12]


class FixError(RuntimeError):
    pass


def apply_fixes(source_root: Path, fixes: tuple[Fix, ...] = FIXES) -> list[str]:
    """Apply every fix in place; return one line per fix for the build log."""
    applied = []
    for fix in fixes:
        target = source_root / fix.path
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
