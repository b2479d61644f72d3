"""The backend interface: what the generator needs from an inference engine, and no more.

A backend runs the two graphs of an artifact folder. The KV cache is opaque to the caller:
a backend keeps it wherever it is cheapest (ONNX Runtime OrtValues, device buffers, ...).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Backend(ABC):
    name: str = "?"
    dtype: np.dtype  # the decoder's floating dtype: inputs_embeds and image_embeds use it
    kv_capacity: int | None = None  # positions a preallocated KV cache holds; None: it grows as needed

    @abstractmethod
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [B,3,H,W] float32 -> image_embeds [B,N_img,hidden] in the decoder's dtype."""

    @abstractmethod
    def empty_cache(self, batch: int) -> Any:
        """A KV cache holding zero positions for `batch` sequences."""

    @abstractmethod
    def decode(
        self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: Any
    ) -> tuple[np.ndarray, Any]:
        """One decoder call: inputs_embeds [B,S,hidden], attention_mask [B,P+S] int64,
        position_ids [B,S] int64, a cache of P positions -> (logits [B,vocab] float32, the
        cache of P+S positions). Prefill is S = prompt length with P = 0; decode is S = 1."""
