"""ONNX Runtime backend: CPU by default, the CUDA execution provider when onnxruntime-gpu is
installed. The KV cache stays in ONNX Runtime's own buffers (OrtValues) between steps, bound
with IO binding, so no step converts the cache to numpy and back.

A decoder of the static KV layout (docs/artifacts.md) gets its buffers [B,kv,max_seq_len,hd]
allocated once per generation (empty_cache), each bound as both its past input and its present
output: GroupQueryAttention writes the new positions into them in place, and nothing is copied
per step. The concat layout's presents are new OrtValues each step (past + new).

Session options come through the constructor (`threads`: intra-op threads, None for ONNX
Runtime's choice); close() drops both sessions, which frees their weights and arenas."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime import contract
from runtime.backends.base import Backend, Limits
from runtime.contract import Manifest
from runtime.errors import ArtifactError, PromptError


def providers() -> tuple[list, str]:
    """(execution providers, device for bound outputs): CUDA first when it is available.

    TF32 off: the CUDA provider's default rounds float32 matmul inputs to 10 mantissa bits,
    and even float16 graphs compute their rotary angles (position x inv_freq) in float32."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"], "cuda"
    return ["CPUExecutionProvider"], "cpu"


def open_session(path: Path, provider_list: list, threads: int | None):
    import onnxruntime as ort

    if not path.is_file():
        raise ArtifactError(f"{path} is missing: re-export with `llava-export all`")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=provider_list)
    except Exception as err:  # ORT raises its own exception types for parse and load errors
        reason = str(err).strip().splitlines()[0][:200]
        raise ArtifactError(
            f"{path} cannot be loaded (truncated or corrupt? {reason}); re-export it"
        ) from None


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None):
        import onnxruntime as ort

        self.ort = ort
        provider_list, self.device = providers()
        self.vision = open_session(folder / manifest.graphs["vision"].file, provider_list, threads)
        self.decoder = open_session(folder / manifest.graphs["decoder"].file, provider_list, threads)
        self.threads = self.decoder.get_session_options().intra_op_num_threads
        if "CUDAExecutionProvider" not in self.decoder.get_providers():
            # onnxruntime-gpu without a usable GPU or CUDA libraries falls back to the CPU (quietly,
            # at this log level): binding outputs to "cuda" would then fail on every call
            self.device = "cpu"
        self.name = "ort-cuda" if self.device == "cuda" else "ort-cpu"
        self.vision_dtype = np.dtype(manifest.graphs["vision"].dtype)
        self.dtype = np.dtype(manifest.graphs["decoder"].dtype)
        text = manifest.text
        self.kv_shape = (text.num_kv_heads, text.head_dim)
        self.past_names = contract.decoder_input_names(text.num_layers)[3:]
        self.output_names = contract.decoder_output_names(text.num_layers)
        # The static layout's buffers hold max_seq_len positions (owner and resize name them in
        # messages); the concat layout's cache grows (max_seq_len is None), up to the model's.
        self.limits = Limits(
            max_positions=text.max_positions,
            kv_capacity=manifest.graphs["decoder"].max_seq_len,
            owner="the decoder's static KV cache",
            resize="llava-export decoder --kv-cache static",
        )

    def encode_images_impl(self, pixel_values: np.ndarray) -> np.ndarray:
        feed = {contract.PIXEL_VALUES: pixel_values.astype(self.vision_dtype, copy=False)}
        return self.vision.run(None, feed)[0].astype(self.dtype, copy=False)

    def empty_cache_impl(self, batch: int) -> list:
        """Concat layout: one empty [B,kv,0,hd] value for every past input. Static layout: a zeroed
        buffer [B,kv,kv_capacity,hd] per past input, the cache of this whole generation."""
        capacity = self.limits.kv_capacity
        if capacity is None:
            empty = np.zeros((batch, self.kv_shape[0], 0, self.kv_shape[1]), dtype=self.dtype)
            return [self.ort.OrtValue.ortvalue_from_numpy(empty, self.device)] * len(self.past_names)
        shape = (batch, self.kv_shape[0], capacity, self.kv_shape[1])
        return [
            self.ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self.dtype), self.device)
            for _ in self.past_names
        ]

    def decode_impl(self, inputs_embeds, attention_mask, position_ids, cache):
        static = self.limits.kv_capacity is not None
        binding = self.decoder.io_binding()
        binding.bind_cpu_input(contract.INPUTS_EMBEDS, np.ascontiguousarray(inputs_embeds, dtype=self.dtype))
        binding.bind_cpu_input(contract.ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input(contract.POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(self.past_names, cache):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(contract.LOGITS, "cpu")  # logits go to the host for sampling
        if not static:
            for name in self.output_names[1:]:
                binding.bind_output(name, self.device)  # presents stay where ORT made them
        else:
            self.check_capacity(attention_mask.shape[1])
            for name, value in zip(self.output_names[1:], cache):
                binding.bind_ortvalue_output(name, value)  # present = past: written in place
        self.decoder.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), (cache if static else outputs[1:])

    def cache_to_host_impl(self, cache: list, length: int) -> list[np.ndarray]:
        # the static layout's buffers hold kv_capacity columns, of which the first `length` are live
        return [np.ascontiguousarray(value.numpy()[:, :, :length]) for value in cache]

    def cache_from_host_impl(self, arrays: list[np.ndarray]) -> list:
        capacity = self.limits.kv_capacity
        if capacity is not None:
            self.check_capacity(arrays[0].shape[2])
            buffers = []
            for array in arrays:
                buffer = np.zeros((*array.shape[:2], capacity, array.shape[3]), dtype=self.dtype)
                buffer[:, :, : array.shape[2]] = array
                buffers.append(buffer)
            arrays = buffers
        return [
            self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, dtype=self.dtype), self.device)
            for a in arrays
        ]

    def check_capacity(self, positions: int) -> None:
        """PromptError before a call would write past the static buffers. generate checks the
        whole request up front (Limits.check), so this guards direct callers of decode only."""
        capacity = self.limits.kv_capacity
        if positions > capacity:
            raise PromptError(
                f"prompt and answer reach {positions} positions; the decoder's static KV cache holds {capacity}: "
                f"ask for fewer new tokens or re-export with `llava-export decoder --kv-cache static --max-seq-len {positions}`"
            )

    def close_impl(self) -> None:
        self.vision = self.decoder = None  # ONNX Runtime frees a session with its last reference
