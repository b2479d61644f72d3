"""A fake `tensorrt` and a fake `cuda.bindings.runtime`, for TensorRT code without a GPU.

"Device memory" is host memory, an "engine" runs its ONNX graph in ONNX Runtime, and both
check what the real ones would refuse (shapes outside the active profile, unset inputs,
outputs aliasing inputs, copies in the wrong direction). This proves the plumbing (staging,
profiles, the ping-pong KV cache, no cache traffic to the host, errors) but not TensorRT
itself: parity_tests/test_tensorrt.py does that on a GPU. The `fake_gpu` fixture installs both.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest


class FakeCudart(types.ModuleType):
    """cuda.bindings.runtime over host memory: every call returns (error, value...) like cuda-python."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToHost = 0
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    class Stream:
        def __int__(self):
            return 0x5EED

    def __init__(self, name=b"NVIDIA Fake 100", major=9, minor=0):
        super().__init__("cuda.bindings.runtime")
        self.props = SimpleNamespace(name=name + b"\0\0\0", major=major, minor=minor)
        self.blocks: dict[int, tuple[ctypes.Array, str]] = {}  # address -> (buffer, "device" | "host")
        self.copies: list[tuple[str, int]] = []  # ("h2d" | "d2h", bytes)
        self.device_limit: int | None = None

    def _alloc(self, nbytes, kind):
        ok = self.cudaError_t.cudaSuccess
        if kind == "device" and self.device_limit is not None:
            used = sum(len(b) for b, k in self.blocks.values() if k == "device")
            if used + nbytes > self.device_limit:
                return (self.cudaError_t.cudaErrorMemoryAllocation, 0)
        buffer = ctypes.create_string_buffer(nbytes)
        self.blocks[ctypes.addressof(buffer)] = (buffer, kind)
        return (ok, ctypes.addressof(buffer))

    def _kind_of(self, address, nbytes):
        for base, (buffer, kind) in self.blocks.items():
            if base <= address and address + nbytes <= base + len(buffer):
                return kind
        return "host"  # ordinary (pageable) host memory

    def cudaMalloc(self, nbytes):
        return self._alloc(nbytes, "device")

    def cudaMallocHost(self, nbytes):
        return self._alloc(nbytes, "pinned")

    def cudaFree(self, address):
        assert self.blocks.pop(address)[1] == "device"
        return (self.cudaError_t.cudaSuccess,)

    def cudaFreeHost(self, address):
        assert self.blocks.pop(address)[1] == "pinned"
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamCreate(self):
        return (self.cudaError_t.cudaSuccess, self.Stream())

    def cudaStreamDestroy(self, stream):
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamSynchronize(self, stream):
        assert isinstance(stream, self.Stream)
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert isinstance(stream, self.Stream)
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            assert self._kind_of(dst, nbytes) == "device" and self._kind_of(src, nbytes) != "device"
            self.copies.append(("h2d", nbytes))
        elif kind == self.cudaMemcpyKind.cudaMemcpyDeviceToHost:
            assert self._kind_of(src, nbytes) == "device" and self._kind_of(dst, nbytes) != "device"
            self.copies.append(("d2h", nbytes))
        else:
            raise AssertionError(f"unexpected copy kind {kind}")
        ctypes.memmove(dst, src, nbytes)
        return (self.cudaError_t.cudaSuccess,)

    def cudaGetDevice(self):
        return (self.cudaError_t.cudaSuccess, 0)

    def cudaGetDeviceProperties(self, index):
        return (self.cudaError_t.cudaSuccess, self.props)

    class cudaDeviceAttr(enum.IntEnum):
        cudaDevAttrMemoryClockRate = 36
        cudaDevAttrGlobalMemoryBusWidth = 37

    def cudaDeviceGetAttribute(self, attribute, device):
        values = {36: 2_343_750, 37: 8192}  # kHz, bits: 4.8 TB/s, an H200's HBM3e
        return (self.cudaError_t.cudaSuccess, values[int(attribute)])

    def cudaGetDeviceCount(self):
        return (self.cudaError_t.cudaSuccess, 1)

    def cudaGetErrorName(self, error):
        return (self.cudaError_t.cudaSuccess, getattr(error, "name", str(error)).encode())


ONNX_TO_NUMPY = {1: np.float32, 10: np.float16, 7: np.int64, 6: np.int32, 9: np.bool_}


def make_fake_tensorrt(state: SimpleNamespace) -> types.ModuleType:
    """The slice of the tensorrt 10 Python API that exporter/engine/build.py and the backend use."""
    import onnx
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = state.version

    class Logger:
        WARNING = 2

        def __init__(self, level=2):
            self.level = level

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 5

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class BuilderFlag(enum.IntEnum):
        TF32 = 7

    class TensorIOMode(enum.Enum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    def nptype(dtype):
        return np.dtype(dtype)

    class IProgressMonitor:
        def __init__(self):
            pass

    class ParserError:
        def __init__(self, node, name, op, desc):
            self._node, self._name, self._op, self._desc = node, name, op, desc

        def node(self):
            return self._node

        def node_name(self):
            return self._name

        def node_operator(self):
            return self._op

        def desc(self):
            return self._desc

    class Network:
        def __init__(self, flags):
            self.flags, self.path, self.inputs, self.outputs = flags, None, [], []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, index):
            return SimpleNamespace(name=self.inputs[index][0])

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            model = onnx.load(path, load_external_data=False)
            if state.reject and Path(path).name == state.reject[0]:
                node = next(i for i, n in enumerate(model.graph.node) if n.op_type == state.reject[1])
                self.errors.append(
                    ParserError(node, model.graph.node[node].name, state.reject[1], "unsupported attribute")
                )
                return False
            initializers = {t.name for t in model.graph.initializer}
            self.network.path = path
            self.network.inputs = [
                (v.name, ONNX_TO_NUMPY[v.type.tensor_type.elem_type])
                for v in model.graph.input
                if v.name not in initializers
            ]
            self.network.outputs = [
                (v.name, ONNX_TO_NUMPY[v.type.tensor_type.elem_type]) for v in model.graph.output
            ]
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, index):
            return self.errors[index]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data

    class OptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = [list(low), list(opt), list(high)]

    class BuilderConfig:
        def __init__(self):
            self.profiles, self.cache, self.progress_monitor, self.pools = [], None, None, {}

        def clear_flag(self, flag):
            state.cleared_flags.append(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            state.caches_loaded.append(bytes(data))
            return None if bytes(data) == b"corrupt" else TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return OptimizationProfile()

        def build_serialized_network(self, network, config):
            assert network.flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            assert config.profiles and all(set(p) == {n for n, _ in network.inputs} for p in config.profiles)
            monitor = config.progress_monitor
            monitor.phase_start("Building engine", None, 3)
            for step in range(3):
                monitor.phase_start("Tactic selection", "Building engine", 2)
                for inner in range(2):
                    if not monitor.step_complete("Tactic selection", inner):
                        return None
                monitor.phase_finish("Tactic selection")
                if state.interrupt_at == Path(network.path).name and step == 1:
                    raise_keyboard_interrupt_inside(monitor)
                if not monitor.step_complete("Building engine", step):
                    return None
            monitor.phase_finish("Building engine")
            if state.fail_build == Path(network.path).name:
                return None
            config.cache.data += b"t"  # the build learned a timing
            plan = {
                "onnx": network.path,
                "profiles": config.profiles,
                "inputs": network.inputs,
                "outputs": network.outputs,
            }
            return json.dumps(plan, default=lambda t: np.dtype(t).str).encode()

    class Engine:
        def __init__(self, plan):
            self.plan = plan
            self.inputs = {n: np.dtype(t) for n, t in plan["inputs"]}
            self.outputs = {n: np.dtype(t) for n, t in plan["outputs"]}
            self.names = [*self.inputs, *self.outputs]
            self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, index):
            return self.names[index]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return self.inputs.get(name, self.outputs.get(name))

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}

        def set_optimization_profile_async(self, index, stream):
            assert stream == 0x5EED
            if index >= len(self.engine.plan["profiles"]):
                return False
            self.profile, self.shapes = index, {}
            return True

        def set_input_shape(self, name, shape):
            low, _, high = self.engine.plan["profiles"][self.profile][name]
            if len(shape) != len(low) or not all(a <= d <= b for a, d, b in zip(low, shape, high)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, address):
            self.addresses[name] = int(address)
            return True

        def execute_async_v3(self, stream):
            assert stream == 0x5EED
            engine = self.engine
            assert set(self.shapes) == set(engine.inputs), "an input has no shape"
            assert set(self.addresses) >= set(engine.names), "a tensor has no address"
            feed = {}
            spans = []
            for name, dtype in engine.inputs.items():
                shape = self.shapes[name]
                nbytes = int(np.prod(shape)) * dtype.itemsize
                raw = (ctypes.c_char * max(nbytes, 1)).from_address(self.addresses[name])
                feed[name] = np.frombuffer(raw, dtype=np.uint8)[:nbytes].view(dtype).reshape(shape).copy()
                spans.append(("in", name, self.addresses[name], nbytes))
            results = engine.session.run(list(engine.outputs), feed)
            for (name, dtype), value in zip(engine.outputs.items(), results):
                value = np.ascontiguousarray(value, dtype=dtype)
                spans.append(("out", name, self.addresses[name], value.nbytes))
                ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
            for kind, name, start, size in spans:  # no output may overwrite an input or another output
                for other_kind, other, other_start, other_size in spans:
                    if name != other and "out" in (kind, other_kind) and size and other_size:
                        assert start + size <= other_start or other_start + other_size <= start, (
                            f"{name} overlaps {other}"
                        )
            state.executions.append(
                {
                    "plan": Path(engine.plan["onnx"]).name,
                    "profile": self.profile,
                    "shapes": dict(self.shapes),
                    "addresses": dict(self.addresses),
                }
            )
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            try:
                return Engine(json.loads(bytes(data)))
            except ValueError:
                return None

    for name, value in dict(locals()).items():
        if not name.startswith("_") and name not in ("trt", "state", "onnx", "ort"):
            setattr(trt, name, value)
    return trt


def raise_keyboard_interrupt_inside(monitor):
    """Ctrl-C during a build: Python raises it in the next callback, the progress monitor's."""
    original = monitor.__class__.say

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monitor.__class__.say = interrupted
    try:
        monitor.step_complete("Building engine", 99)
    finally:
        monitor.__class__.say = original


@pytest.fixture
def fake_gpu(monkeypatch):
    """Installs the fake tensorrt and cuda.bindings.runtime; yields their shared state."""
    state = SimpleNamespace(
        version="10.99.1",
        reject=None,
        fail_build=None,
        interrupt_at=None,
        caches_loaded=[],
        executions=[],
        cleared_flags=[],
    )
    cudart = FakeCudart()
    state.cudart = cudart
    trt = make_fake_tensorrt(state)
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, cudart
    for name, module in {
        "tensorrt": trt,
        "cuda": cuda,
        "cuda.bindings": bindings,
        "cuda.bindings.runtime": cudart,
    }.items():
        module.__spec__ = importlib.machinery.ModuleSpec(
            name, None
        )  # torch._dynamo probes find_spec("tensorrt")
        monkeypatch.setitem(sys.modules, name, module)
    return state


FAKE_FOLDER = "nvidia-fake-100-sm90-trt10.99.1"
