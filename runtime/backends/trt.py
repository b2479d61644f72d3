"""TensorRT backend: the engines `llava-export engine` built for this GPU, run on one CUDA
stream with device memory from cuda-python (no torch).

    DIR/engines/<gpu>-sm<cc>-trt<version>/{vision,decoder}.plan + engine.json
    (runtime.engines picks the folder for this GPU and TensorRT version, or says how to build it)

The KV cache stays on the device from step to step (only a continuous-batching regroup,
cache_to_host then cache_from_host, copies it out and back). The decoder's past inputs are
[B,kv,P,hd] and its presents [B,kv,P+S,hd], dense; two device slabs, each with room for every
layer's key and value at the engine's full capacity [B,kv,max_seq_len,hd], take turns:

    step t:   past <- slab[t % 2] (P positions)    present -> slab[(t + 1) % 2] (P+S positions)
    step t+1: past <- slab[(t + 1) % 2]            present -> slab[t % 2]

so each step's presents are the next step's pasts with no copy and no host round trip. Per
token only the new token's embedding goes up (hidden values) and the logits come down
([B,vocab] float32, through pinned memory). The cache handle given to the generator is a
small record (batch, length, slab, generation): the backend holds one live cache at a time,
and a handle that is not the latest is refused rather than read from overwritten memory.

The engine's build limits are the backend's `Limits` (max_batch, max_input_len, and
max_seq_len as the KV capacity), checked before any compute; a call outside every
optimization profile is still refused (EngineError) rather than run.

Image embeddings are computed on the device and come down once per request (N_img x hidden
values, a few MB): the generator splices them with the text embeddings on the host, as it
does for every backend, and the prefill sends the spliced prompt up once.

tensorrt and cuda-python are imported lazily, when a backend is created.
"""

from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime import contract, engines
from runtime.backends.base import Backend, Limits
from runtime.contract import Manifest
from runtime.engines import GpuIdentity
from runtime.errors import EngineError, PromptError

INSTALL = "pip install 'llava-export[gpu]' (see the README, GPU install)"
ALIGN = 256  # bytes: TensorRT wants I/O addresses aligned (256 covers every dtype and vector load)


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise EngineError(
            f"TensorRT is not installed, so TensorRT engines can neither be built nor run: {INSTALL}"
        ) from None
    return tensorrt


def import_cudart():
    """cuda-python's runtime API: cuda.bindings.runtime (12.6+), else the older cuda.cudart."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise EngineError(
                f"cuda-python is not installed (the TensorRT backend allocates device memory with it): {INSTALL}"
            ) from None
    return runtime


def aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


class Cuda:
    """The few CUDA runtime calls this backend makes, each checked (EngineError on failure).

    cuda-python returns (error,) or (error, value) from every call."""

    def __init__(self, cudart=None):
        self.rt = cudart if cudart is not None else import_cudart()

    def call(self, what: str, result):
        if not isinstance(result, tuple):
            result = (result,)
        error, values = result[0], result[1:]
        if error != self.rt.cudaError_t.cudaSuccess:
            raise EngineError(f"CUDA call {what} failed: {self.error_name(error)}")
        return values[0] if len(values) == 1 else values

    def error_name(self, error) -> str:
        try:
            name = self.rt.cudaGetErrorName(error)[1]
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # reporting an error must not raise another
            return str(error)

    def device(self) -> tuple[str, int, int]:
        """(name, major, minor) of the current device."""
        index = self.call("cudaGetDevice", self.rt.cudaGetDevice())
        props = self.call("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(index))
        name = props.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
        return str(name).strip(), int(props.major), int(props.minor)

    def malloc(self, nbytes: int) -> int:
        return int(self.call(f"cudaMalloc({nbytes} bytes)", self.rt.cudaMalloc(max(aligned(nbytes), ALIGN))))

    def free(self, pointer: int) -> None:
        self.call("cudaFree", self.rt.cudaFree(pointer))

    def malloc_host(self, nbytes: int) -> int:
        """Page-locked host memory: copies from it are truly asynchronous, and faster."""
        return int(
            self.call(f"cudaMallocHost({nbytes} bytes)", self.rt.cudaMallocHost(max(aligned(nbytes), ALIGN)))
        )

    def free_host(self, pointer: int) -> None:
        self.call("cudaFreeHost", self.rt.cudaFreeHost(pointer))

    def stream(self):
        return self.call("cudaStreamCreate", self.rt.cudaStreamCreate())

    def destroy_stream(self, stream) -> None:
        self.call("cudaStreamDestroy", self.rt.cudaStreamDestroy(stream))

    def upload(self, device: int, host: int, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call("cudaMemcpyAsync (to device)", self.rt.cudaMemcpyAsync(device, host, nbytes, kind, stream))

    def download(self, host: int, device: int, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call("cudaMemcpyAsync (to host)", self.rt.cudaMemcpyAsync(host, device, nbytes, kind, stream))

    def synchronize(self, stream) -> None:
        self.call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))


def gpu_identity(cuda: Cuda, trt) -> GpuIdentity:
    name, major, minor = cuda.device()
    return GpuIdentity(name, major, minor, str(trt.__version__))


class Staging:
    """One device buffer and its page-locked host twin, of a fixed capacity in bytes."""

    def __init__(self, cuda: Cuda, nbytes: int):
        self.cuda, self.nbytes = cuda, nbytes
        self.device = cuda.malloc(nbytes)
        self.host = cuda.malloc_host(nbytes)
        self.host_bytes = np.frombuffer(
            (ctypes.c_char * aligned(max(nbytes, 1))).from_address(self.host), dtype=np.uint8
        )

    def host_view(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        if count * np.dtype(dtype).itemsize > self.nbytes:
            raise EngineError(
                f"internal: {shape} {np.dtype(dtype)} exceeds a staging buffer of {self.nbytes} bytes"
            )
        return self.host_bytes[: count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def upload(self, array: np.ndarray, stream) -> tuple[int, ...]:
        """Copies `array` into pinned memory, then (asynchronously) to the device."""
        view = self.host_view(array.shape, array.dtype)
        np.copyto(view, array, casting="no")
        self.cuda.upload(self.device, self.host, view.nbytes, stream)
        return array.shape

    def download(self, shape: tuple[int, ...], dtype: np.dtype, stream) -> np.ndarray:
        """Starts the copy back; the returned view is valid after the stream synchronizes."""
        view = self.host_view(shape, dtype)
        self.cuda.download(self.host, self.device, view.nbytes, stream)
        return view

    def free(self) -> None:
        self.cuda.free(self.device)
        self.cuda.free_host(self.host)


class EngineRunner:
    """One deserialized engine and its execution context."""

    def __init__(self, trt, runtime, plan: Path, stream_handle: int, rebuild: str):
        try:
            engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        except OSError as err:
            raise EngineError(f"{plan} is unreadable ({err}): rebuild with `{rebuild}`") from None
        if engine is None:
            raise EngineError(
                f"TensorRT cannot load {plan} (corrupt, or built by another TensorRT): rebuild with `{rebuild}`"
            )
        self.trt, self.engine, self.plan, self.stream = trt, engine, plan, stream_handle
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"TensorRT cannot create an execution context for {plan} (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.profile: int | None = None

    def check_io(self, inputs: list[str], outputs: list[str]) -> None:
        if sorted(self.inputs) != sorted(inputs) or sorted(self.outputs) != sorted(outputs):
            raise EngineError(f"{self.plan} does not have the inputs and outputs its graph has: rebuild it")

    def run(self, profile: int, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int]) -> None:
        """Enqueues one execution on the stream: every input's shape, every tensor's address."""
        context = self.context
        if profile != self.profile:
            if not context.set_optimization_profile_async(profile, self.stream):
                raise EngineError(f"TensorRT refused optimization profile {profile} of {self.plan.name}")
            self.profile = profile
        for name, shape in shapes.items():
            if not context.set_input_shape(name, tuple(int(d) for d in shape)):
                raise EngineError(
                    f"TensorRT refused shape {tuple(shape)} for {name} in {self.plan.name} (profile {profile})"
                )
        for name, address in addresses.items():
            if not context.set_tensor_address(name, int(address)):
                raise EngineError(f"TensorRT refused the address of {name} in {self.plan.name}")
        if not context.execute_async_v3(self.stream):
            raise EngineError(f"TensorRT failed to run {self.plan.name} (see its messages above)")


class KvSlabs:
    """Two device slabs for the ping-pong KV cache; each holds `tensors` tensors of up to
    [batch, kv_heads, max_seq_len, head_dim], `stride` bytes apart."""

    def __init__(
        self,
        cuda: Cuda,
        tensors: int,
        batch: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: np.dtype,
    ):
        self.cuda, self.batch = cuda, batch
        self.stride = aligned(batch * kv_heads * max_seq_len * head_dim * np.dtype(dtype).itemsize)
        self.bases: list[int] = []
        try:
            for _ in range(2):
                self.bases.append(cuda.malloc(tensors * self.stride))
        except EngineError:
            self.free()
            raise EngineError(
                f"not enough GPU memory for the KV cache ({2 * tensors * self.stride / 2**30:.1f} GiB for batch {batch} at "
                f"{max_seq_len} positions): rebuild the engines with a smaller --max-seq-len or --max-batch"
            ) from None

    def address(self, slab: int, tensor: int) -> int:
        return self.bases[slab] + tensor * self.stride

    def free(self) -> None:
        for base in self.bases:
            self.cuda.free(base)
        self.bases = []


@dataclass(frozen=True)
class TrtCache:
    """The KV cache as the generator sees it: `length` positions of `batch` rows in slab `slab`."""

    batch: int
    length: int
    slab: int
    generation: int
    step: int


class TrtBackend(Backend):
    name = "trt"

    def __init__(self, folder: Path, manifest: Manifest):
        self.closed = True  # nothing to release until the stream exists
        trt = import_tensorrt()
        self.cuda = Cuda()
        self.identity = gpu_identity(self.cuda, trt)
        folder = Path(folder)
        self.engine_folder = engines.select_engine(folder, manifest, self.identity)
        self.rebuild = engines.rebuild_command(folder)
        built = self.engine_folder.limits
        self.limits = Limits(
            max_positions=manifest.text.max_positions,
            kv_capacity=built.max_seq_len,
            max_input=built.max_input_len,
            max_batch=built.max_batch,
            owner="the TensorRT engine",
            resize=self.rebuild,
        )
        self.vision_profiles = self.engine_folder.profiles("vision")
        self.decoder_profiles = self.engine_folder.profiles("decoder")
        self.manifest = manifest
        text = manifest.text
        self.kv_heads, self.head_dim = text.num_kv_heads, text.head_dim
        self.past_names = contract.decoder_input_names(text.num_layers)[3:]
        self.present_names = contract.decoder_output_names(text.num_layers)[1:]

        self.buffers: list[Staging] = []
        self.kv: KvSlabs | None = None
        self.stream = self.cuda.stream()
        self.closed = False
        stream = int(self.stream)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.vision = EngineRunner(trt, self.runtime, self.engine_folder.plan("vision"), stream, self.rebuild)
        self.vision.check_io([contract.PIXEL_VALUES], [contract.IMAGE_EMBEDS])
        self.decoder = EngineRunner(
            trt, self.runtime, self.engine_folder.plan("decoder"), stream, self.rebuild
        )
        self.decoder.check_io(
            contract.decoder_input_names(text.num_layers), contract.decoder_output_names(text.num_layers)
        )
        self.dtype = self.decoder.dtypes[contract.INPUTS_EMBEDS]
        if self.dtype != np.dtype(manifest.graphs["decoder"].dtype):
            raise EngineError(
                f"{self.engine_folder.plan('decoder')} runs in {self.dtype}, the decoder graph in {manifest.graphs['decoder'].dtype}: rebuild with `{self.rebuild}`"
            )
        self.kv_dtype = self.decoder.dtypes[self.past_names[0]]

        size, tokens = manifest.preprocess.crop_size, manifest.vision.num_image_tokens
        batch, hidden = built.max_batch, text.hidden_size
        # tiles per vision run: the most the engine's own profile takes (max_batch x the tiles one
        # image can take, as built now; an engine built otherwise still runs, in smaller chunks)
        self.tiles_per_run = max(p.shapes[contract.PIXEL_VALUES].max[0] for p in self.vision_profiles)
        self.pixel_dtype = self.vision.dtypes[contract.PIXEL_VALUES]
        self.image_dtype = self.vision.dtypes[contract.IMAGE_EMBEDS]
        self.pixels = self.staging(self.tiles_per_run * 3 * size * size * self.pixel_dtype.itemsize)
        self.images = self.staging(self.tiles_per_run * tokens * hidden * self.image_dtype.itemsize)
        self.embeds = self.staging(batch * built.max_input_len * hidden * self.dtype.itemsize)
        self.mask = self.staging(batch * built.max_seq_len * 8)
        self.positions = self.staging(batch * built.max_input_len * 8)
        self.logits = self.staging(batch * text.vocab_size * 4)
        self.generations = itertools.count()
        self.live: tuple[int, int] | None = None  # (generation, step) of the one valid cache
        self.kv_host: Staging | None = None  # one slab tensor's worth, for cache_to/from_host

    def staging(self, nbytes: int) -> Staging:
        buffer = Staging(self.cuda, nbytes)
        self.buffers.append(buffer)
        return buffer

    # -- vision ---------------------------------------------------------------------------------

    def encode_images_impl(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N,3,H,W] -> [N,N_img,hidden] in the decoder's dtype (N images, or anyres tiles),
        as many per run as the vision profile takes."""
        count, per_run = len(pixel_values), self.tiles_per_run
        tokens, hidden = self.manifest.vision.num_image_tokens, self.manifest.text.hidden_size
        result = np.empty((count, tokens, hidden), dtype=self.dtype)
        for start in range(0, count, per_run):
            chunk = np.ascontiguousarray(pixel_values[start : start + per_run], dtype=self.pixel_dtype)
            shapes = {contract.PIXEL_VALUES: chunk.shape}
            profile = engines.find_profile(self.vision_profiles, shapes)
            if profile is None:
                raise EngineError(
                    f"the vision engine takes images of shape {self.vision_profiles[0].shapes[contract.PIXEL_VALUES].max[1:]}, not {chunk.shape[1:]}: rebuild with `{self.rebuild}`"
                )
            self.pixels.upload(chunk, self.stream)
            addresses = {contract.PIXEL_VALUES: self.pixels.device, contract.IMAGE_EMBEDS: self.images.device}
            self.vision.run(profile, shapes, addresses)
            out = self.images.download((len(chunk), tokens, hidden), self.image_dtype, self.stream)
            self.cuda.synchronize(self.stream)
            result[start : start + len(chunk)] = out
        return result

    # -- decoder --------------------------------------------------------------------------------

    def slabs_for(self, batch: int) -> KvSlabs:
        """The KV slabs, reallocated (which ends the live cache) when `batch` rows do not fit."""
        if self.kv is None or self.kv.batch < batch:
            if self.kv is not None:
                self.live = None  # its memory is going
                self.kv.free()
                self.kv = None
            self.kv = KvSlabs(
                self.cuda,
                len(self.past_names),
                batch,
                self.kv_heads,
                self.limits.kv_capacity,
                self.head_dim,
                self.kv_dtype,
            )
        return self.kv

    def empty_cache_impl(self, batch: int) -> TrtCache:
        self.slabs_for(batch)
        generation = next(self.generations)
        self.live = (generation, 0)
        return TrtCache(batch, 0, 0, generation, 0)

    def check_live(self, cache) -> None:
        if not isinstance(cache, TrtCache) or self.live != (cache.generation, cache.step):
            raise EngineError(
                "this KV cache is not the TensorRT backend's latest one (it keeps one cache on the device)"
            )

    def decode_impl(self, inputs_embeds, attention_mask, position_ids, cache: TrtCache):
        self.check_live(cache)
        batch, sequence, hidden = inputs_embeds.shape
        past = cache.length
        if (
            batch != cache.batch
            or attention_mask.shape != (batch, past + sequence)
            or position_ids.shape != (batch, sequence)
        ):
            raise EngineError(
                f"decoder inputs disagree: embeds {inputs_embeds.shape}, mask {attention_mask.shape}, positions "
                f"{position_ids.shape}, cache of {cache.batch} x {past}"
            )
        kv = (batch, self.kv_heads, past, self.head_dim)
        shapes = {
            contract.INPUTS_EMBEDS: (batch, sequence, hidden),
            contract.ATTENTION_MASK: (batch, past + sequence),
            contract.POSITION_IDS: (batch, sequence),
            **{name: kv for name in self.past_names},
        }
        probe = {
            name: shapes[name]
            for name in (
                contract.INPUTS_EMBEDS,
                contract.ATTENTION_MASK,
                contract.POSITION_IDS,
                self.past_names[0],
            )
        }
        profile = engines.find_profile(
            self.decoder_profiles, probe, partial=True
        )  # per token: 4 checks, not 3 + 2 x layers
        if profile is None:
            raise EngineError(
                f"no optimization profile of the decoder engine takes {batch} x {sequence} new positions after {past} "
                f"cached ones (prefill runs with an empty cache, decode one token at a time)"
            )
        self.embeds.upload(np.ascontiguousarray(inputs_embeds, dtype=self.dtype), self.stream)
        self.mask.upload(np.ascontiguousarray(attention_mask, dtype=np.int64), self.stream)
        self.positions.upload(np.ascontiguousarray(position_ids, dtype=np.int64), self.stream)
        source, target = cache.slab, 1 - cache.slab
        addresses = {
            contract.INPUTS_EMBEDS: self.embeds.device,
            contract.ATTENTION_MASK: self.mask.device,
            contract.POSITION_IDS: self.positions.device,
            contract.LOGITS: self.logits.device,
        }
        for index, (past_name, present_name) in enumerate(zip(self.past_names, self.present_names)):
            addresses[past_name] = self.kv.address(source, index)
            addresses[present_name] = self.kv.address(target, index)
        self.decoder.run(profile, shapes, addresses)
        logits = self.logits.download((batch, self.manifest.text.vocab_size), np.float32, self.stream)
        self.cuda.synchronize(self.stream)
        self.live = (cache.generation, cache.step + 1)
        return logits.copy(), TrtCache(batch, past + sequence, target, cache.generation, cache.step + 1)

    # -- regrouping (continuous batching) --------------------------------------------------------

    def kv_staging(self) -> Staging:
        """Pinned memory for one tensor of the current slabs (the device twin goes unused): made
        on the first regroup, so a backend that never regroups pays nothing, and again when the
        slabs grow."""
        if self.kv_host is None or self.kv_host.nbytes < self.kv.stride:
            if self.kv_host is not None:
                self.buffers.remove(self.kv_host)
                self.kv_host.free()
                self.kv_host = None
            self.kv_host = self.staging(self.kv.stride)
        return self.kv_host

    def cache_to_host_impl(self, cache: TrtCache, length: int) -> list[np.ndarray]:
        """The live cache's first `length` positions, [B,kv,length,hd] per past input, in the KV
        dtype. Each tensor of the cache lies contiguous [B,kv,T,hd] (T = cache.length) in its
        slab: all of it comes down, one tensor at a time through pinned memory, and is cut to
        `length` positions on the host."""
        self.check_live(cache)
        if not 0 <= length <= cache.length:
            raise EngineError(f"cache_to_host asks for {length} positions of a cache holding {cache.length}")
        full = (cache.batch, self.kv_heads, cache.length, self.head_dim)
        staging = self.kv_staging()
        arrays = []
        for index in range(len(self.past_names)):
            view = staging.host_view(full, self.kv_dtype)
            if view.nbytes:
                self.cuda.download(staging.host, self.kv.address(cache.slab, index), view.nbytes, self.stream)
                self.cuda.synchronize(self.stream)  # before the next tensor reuses the pinned buffer
            arrays.append(view[:, :, :length].copy())  # C-contiguous, and off the pinned buffer
        return arrays

    def cache_from_host_impl(self, arrays: list[np.ndarray]) -> TrtCache:
        """A new live cache of these [B,kv,P,hd] arrays, in slab 0 (the slabs grow when B rows do
        not fit). Whatever cache was live before is no longer: its slab may be overwritten."""
        if len(arrays) != len(self.past_names):
            raise EngineError(
                f"cache_from_host takes {len(self.past_names)} arrays (one per past input), not {len(arrays)}"
            )
        first = tuple(np.shape(arrays[0])) if arrays else ()
        batch, positions = (first[0], first[2]) if len(first) == 4 else (0, 0)
        expected = (batch, self.kv_heads, positions, self.head_dim)
        for name, array in zip(self.past_names, arrays):
            if tuple(np.shape(array)) != expected or batch < 1:
                raise EngineError(
                    f"cache_from_host: {name} is {tuple(np.shape(array))}; every past input takes "
                    f"[B,{self.kv_heads},P,{self.head_dim}] with the same B >= 1 and P"
                )
        limits = self.limits
        if batch > limits.max_batch:
            raise EngineError(
                f"{batch} sequences in one batch; {limits.owner} takes at most {limits.max_batch}: "
                f"send fewer{limits.or_resize([f'--max-batch {batch}'])}"
            )
        if positions > limits.kv_capacity:
            fix = limits.or_resize(
                [f"--max-seq-len {positions}"] if positions <= limits.max_positions else []
            )
            raise PromptError(
                f"prompt and answer reach {positions} positions; {limits.owner} holds {limits.kv_capacity}: "
                f"ask for fewer new tokens{fix}"
            )
        kv = self.slabs_for(batch)
        staging = self.kv_staging()
        self.live = None  # slab 0 is overwritten from here on
        for index, array in enumerate(arrays):
            view = staging.host_view(expected, self.kv_dtype)
            np.copyto(view, array, casting="same_kind")
            if view.nbytes:
                self.cuda.upload(kv.address(0, index), staging.host, view.nbytes, self.stream)
                self.cuda.synchronize(self.stream)  # before the next tensor reuses the pinned buffer
        generation = next(self.generations)
        self.live = (generation, 0)
        return TrtCache(batch, positions, 0, generation, 0)

    # -- cleanup --------------------------------------------------------------------------------

    def close_impl(self) -> None:
        """Frees device and pinned memory (also done when the backend is garbage-collected)."""
        try:
            self.cuda.synchronize(self.stream)
        except EngineError:
            pass
        self.decoder = self.vision = None  # context and engine go before the memory they use
        if self.kv is not None:
            self.kv.free()
            self.kv = None
        for buffer in self.buffers:
            buffer.free()
        self.buffers = []
        self.kv_host = None
        self.cuda.destroy_stream(self.stream)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def load_trt_backend(folder: Path, manifest: Manifest) -> TrtBackend:
    engines.require_engines(Path(folder))
    return TrtBackend(Path(folder), manifest)
