"""Loading a LLaVA checkpoint: the exporter's single entry point for a source.

SRC is a local folder or a hub id, in either format:
  - "hf": transformers `LlavaForConditionalGeneration` (llava-hf/llava-1.5-7b-hf style), or
    `LlavaNextForConditionalGeneration` (LLaVA-1.6, llava-hf/llava-v1.6-mistral-7b-hf style);
  - "original": the haotian-liu/LLaVA repo's (liuhaotian/llava-v1.5-7b style, and what its LoRA
    merge writes): a Llama-family config with mm_* fields, weights `model.layers.*`,
    `model.mm_projector.*`, `lm_head.*`, and a CLIP tower in a separate checkpoint named by
    `mm_vision_tower` (or `--vision-tower PATH`). LLaVA-1.6 (liuhaotian/llava-v1.6-vicuna-7b)
    adds `image_aspect_ratio: anyres`, its pinpoints, `model.image_newline` and, with
    `unfreeze_mm_vision_tower`, the fine-tuned tower's weights in the checkpoint.
Both become the same reference (`LlavaForConditionalGeneration`, or `LlavaNextForConditionalGeneration`
for LLaVA-1.6) plus one normalized description (VisionSpec, TextSpec, PreprocessSpec, template;
AnyresSpec for LLaVA-1.6) that export and runtime use.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from runtime.contract import (
    MERGE_SPATIAL_UNPAD,
    AnyresSpec,
    PreprocessSpec,
    TextSpec,
    VisionSpec,
    file_sha256,
)
from runtime.errors import SourceError

# Text families we export, by the transformers model_type of the text config. The original
# repo's config model_types map onto them.
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
ORIGINAL_MODEL_TYPES = {
    "llava": "llama",
    "llava_llama": "llama",
    "llava_mistral": "mistral",
    "llava_qwen": "qwen2",
    "llava_qwen2": "qwen2",
}
DEFAULT_TEMPLATES = {"llama": "vicuna_v1", "mistral": "mistral_instruct", "qwen2": "chatml"}
# The reference's (config, model) classes in transformers, by the HF config's model_type.
HF_CLASSES = {
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration"),  # LLaVA-1.5
    "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),  # LLaVA-1.6
}
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PROJECTOR_PATTERN = re.compile(r"^(linear|mlp(\d+)x_gelu)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class SourceInput:
    """One of the folders a source was assembled from, when it is more than one (a LoRA
    folder on its base): the manifest records each with its sha256."""

    role: str  # "base" | "adapter" | "projector" | "vision_tower"
    path: Path
    files: list[Path]
    details: dict = field(default_factory=dict)  # the adapter's r, alpha, rslora


@dataclass
class LlavaSource:
    """A loaded source: the PyTorch reference and everything export and runtime need."""

    path: Path
    format: str  # "hf" | "original"
    model: nn.Module  # transformers LlavaForConditionalGeneration, eval mode
    vision: VisionSpec
    text: TextSpec
    preprocess: PreprocessSpec
    template: str
    tokenizer_dir: Path
    weight_files: list[Path]
    inputs: list[SourceInput] = field(default_factory=list)  # empty for a whole model in one folder
    # LLaVA-1.6 (LlavaNextForConditionalGeneration, or the original repo's image_aspect_ratio
    # "anyres"): its tiling; None for LLaVA-1.5
    anyres: AnyresSpec | None = None
    # load_source(stream_decoder=True): `model` is on the meta device and the checkpoint's
    # tensors are read from here, one at a time, by the reference's names (graphs/streamed.py)
    tensors: object | None = None

    @functools.cached_property
    def input_sha256(self) -> dict[str, str]:
        return {item.role: file_sha256(*item.files) for item in self.inputs}

    @functools.cached_property
    def weights_sha256(self) -> str:
        """The manifest's model identity: sha256 over the weight files' bytes, in name order
        (tower files included); for a source of several inputs, over their sha256s. Each file
        is read once per source (a 7B checkpoint is 14 GB), however many graphs are exported."""
        if not self.inputs:
            return file_sha256(*self.weight_files)
        lines = "".join(f"{role} {digest}\n" for role, digest in self.input_sha256.items())
        return hashlib.sha256(lines.encode()).hexdigest()

    def describe(self) -> dict:
        """The manifest's `source`: the path, format and identity, and each input's."""
        described = {"path": str(self.path), "format": self.format, "weights_sha256": self.weights_sha256}
        for item in self.inputs:
            described[item.role] = {
                "path": str(item.path),
                "sha256": self.input_sha256[item.role],
                **item.details,
            }
        return described


def load_source(
    src: str,
    vision_tower: str | None = None,
    dtype: torch.dtype = torch.float32,
    model_base: str | None = None,
    stream_decoder: bool = False,
) -> LlavaSource:
    """Loads SRC (folder or hub id) in either format, or a training output (LoRA folder,
    projector-only checkpoint) merged onto `model_base`; raises SourceError naming what to fix.
    `stream_decoder` (a whole model only): no weight is loaded; the model is built on the meta
    device and `tensors` reads each of the checkpoint's tensors when asked (a quantized export
    of a model whose float weights do not fit in memory)."""
    from exporter.adapters import TRAINING_OUTPUTS, checkpoint_kind, load_training_output

    quiet_transformers()
    folder = resolve_folder(src, what="model", flag="--model")
    kind = checkpoint_kind(folder)
    if kind in TRAINING_OUTPUTS:
        if model_base is None:
            raise SourceError(
                f"{folder} is {TRAINING_OUTPUTS[kind]}: pass the model it was trained on with --model-base BASE"
            )
        base = resolve_folder(model_base, what="base model", flag="--model-base")
        loaded = load_training_output(kind, folder, base, vision_tower, dtype)
    else:
        if model_base is not None:
            raise SourceError(
                f"{folder} is a whole model, not a LoRA folder or a projector-only checkpoint: drop --model-base"
            )
        loaded = load_model(folder, vision_tower, dtype, stream_decoder)
    # Eager attention computes softmax in float32 even in a float16 model, and exports to
    # plain MatMul/Softmax that every runtime (and TensorRT's fusions) understand.
    loaded.model.set_attn_implementation("eager")
    return loaded


def load_model(
    folder: Path, vision_tower: str | None, dtype: torch.dtype, stream: bool = False
) -> LlavaSource:
    """A whole model in one folder, in either format; `stream`: on meta, read when asked."""
    config = read_json(folder / "config.json", what="model config")
    if detect_format(config, folder) == "hf":
        return load_hf(folder, config, dtype, stream)
    return load_original(folder, config, vision_tower, dtype, stream=stream)


def quiet_transformers() -> None:
    """No per-tensor progress bars or advisory logs: the exporter reports its own stages."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def resolve_folder(src: str, what: str, flag: str) -> Path:
    """A local folder as is; otherwise a hub id fetched into (or found in) the local cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SourceError(f"{what} {src} is a file, not a folder ({flag})")
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise SourceError(f"{what} {src} does not exist ({flag} takes a folder or a hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src))
    except Exception as err:  # offline, unknown repo, gated repo: all say the same to the user
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SourceError(
            f"cannot fetch {what} {src} from the hub ({reason}); pass a local folder with {flag}"
        ) from None


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise SourceError(f"{path.parent} has no {path.name}: it is not a model folder ({what} missing)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise SourceError(f"{path} is not valid JSON ({err})") from None


def detect_format(config: dict, folder: Path) -> str:
    if (
        "mm_vision_tower" in config
        or config.get("model_type", "") in ORIGINAL_MODEL_TYPES
        and "vision_config" not in config
    ):
        return "original"
    if config.get("model_type") in HF_CLASSES and "vision_config" in config:
        return "hf"
    kind = config.get("model_type", "unknown")
    raise SourceError(
        f"{folder} is not a LLaVA model (model_type {kind!r}, no vision tower): expected a "
        "LlavaForConditionalGeneration or LlavaNextForConditionalGeneration folder, or an original "
        "LLaVA checkpoint with mm_vision_tower"
    )


def hf_classes(model_type: str) -> tuple[type, type]:
    """transformers' (config, model) classes of a HF_CLASSES model_type."""
    import transformers

    return tuple(getattr(transformers, name) for name in HF_CLASSES[model_type])


# ---------------------------------------------------------------------------------------------
# Hugging Face format


def load_hf(folder: Path, config: dict, dtype: torch.dtype, stream: bool = False) -> LlavaSource:
    """A LlavaForConditionalGeneration folder, or a LlavaNextForConditionalGeneration one
    (LLaVA-1.6); everything is checked before the weights are read."""
    config_class, model_class = hf_classes(config["model_type"])
    llava_config = config_class.from_pretrained(folder)
    family = text_family(llava_config.text_config.model_type)
    check_feature_layer(folder, llava_config.vision_feature_layer)
    if llava_config.projector_hidden_act != "gelu":
        raise SourceError(
            f"{folder}: projector activation {llava_config.projector_hidden_act!r} is not supported (gelu only)"
        )
    vision = vision_spec(llava_config, "mlp2x_gelu")
    anyres = None
    if llava_config.model_type == "llava_next":
        anyres = anyres_spec(folder, llava_config.image_grid_pinpoints, vision.image_size, width_first=False)
    processor = load_processor_config(folder)
    # LlavaNextImageProcessor's do_pad pads a batch's tile counts, not the image to a square
    aspect = "pad" if processor.get("do_pad") and anyres is None else "crop"
    preprocess = preprocess_spec(processor, llava_config.vision_config, aspect)
    if anyres:
        check_anyres_fits(folder, folder, vision, preprocess, "vision_feature_select_strategy 'full'")
    tensors = None
    if stream:
        from exporter.graphs.streamed import CheckpointTensors

        model = build_empty_model(llava_config, 2, dtype, device="meta")
        tensors = CheckpointTensors(weight_files(folder), hf_reference_name)
    else:
        model = model_class.from_pretrained(folder, config=llava_config, dtype=dtype)
        model.eval().requires_grad_(False)
    return LlavaSource(
        tensors=tensors,
        path=folder,
        format="hf",
        model=model,
        vision=vision,
        text=text_spec(llava_config.text_config, family),
        preprocess=preprocess,
        template=DEFAULT_TEMPLATES[family],
        tokenizer_dir=folder,
        weight_files=weight_files(folder),
        anyres=anyres,
    )


def hf_reference_name(key: str) -> str:
    """adapters.hf_name, and LLaVA-1.6's `image_newline` as llava-hf's checkpoints (and
    transformers' save_pretrained) name it, outside the model: the reference's is
    model.image_newline (from_pretrained maps it so)."""
    from exporter.adapters import hf_name

    name = hf_name(key)
    return "model.image_newline" if name == "image_newline" else name


def load_processor_config(folder: Path) -> dict:
    """The image processor's settings; {} when the folder has none (CLIP defaults apply)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    processor = read_json(path, "image processor config")
    return processor.get("image_processor", processor)  # a processor_config nests it


# ---------------------------------------------------------------------------------------------
# Original LLaVA format


def load_original(
    folder: Path,
    config: dict,
    vision_tower: str | None,
    dtype: torch.dtype,
    base: Path | None = None,
    trained: list[Path] | None = None,
    stream: bool = False,
) -> LlavaSource:
    """The model `config` (an original-format config.json in `folder`) describes, with the
    weights of `folder`; or, for a training output, those of `base` (the LLaVA or language
    model it was trained on) overlaid with its `trained` files (non_lora_trainables.bin,
    mm_projector.bin), keys behind PEFT's prefix as LLaVA's loader takes them.

    `image_aspect_ratio: anyres` (LLaVA-1.6) makes a LlavaNextConfig reference. With
    `unfreeze_mm_vision_tower` (LLaVA-1.6's), the checkpoint's tower weights replace those of
    mm_vision_tower, as in LLaVA's loader (which builds that tower before loading the checkpoint)."""
    from transformers import CLIPVisionConfig

    family = text_family(ORIGINAL_MODEL_TYPES.get(config.get("model_type", ""), config.get("model_type", "")))
    projector = config.get("mm_projector_type", "linear")
    depth = projector_depth(projector, folder)
    tower_src = vision_tower or config.get("mm_vision_tower") or config.get("vision_tower")
    if not tower_src:
        raise SourceError(
            f"{folder}/config.json names no mm_vision_tower: pass the CLIP tower with --vision-tower PATH"
        )
    near = [folder] if base is None else [folder, base]
    tower = resolve_tower(tower_src, near, explicit=vision_tower is not None)
    select_feature = config.get("mm_vision_select_feature", "patch")
    if select_feature not in ("patch", "cls_patch"):
        raise SourceError(
            f"{folder}: mm_vision_select_feature {select_feature!r} is not supported (patch, cls_patch)"
        )
    check_feature_layer(folder, config.get("mm_vision_select_layer", -2))
    vision_config = CLIPVisionConfig.from_pretrained(tower)
    anyres = original_anyres(folder, config, vision_config.image_size)

    config_class, _ = hf_classes("llava" if anyres is None else "llava_next")
    llava_config = config_class(
        vision_config=vision_config.to_dict(),
        text_config=text_config_dict(config, family),
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select_feature == "patch" else "full",
        # The reference needs a placeholder id for its own splice; id 0 (<unk> in Llama
        # tokenizers) never comes out of our prompts. The runtime does not use it.
        image_token_index=0,
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        **({} if anyres is None else {"image_grid_pinpoints": anyres.grid_pinpoints}),
    )
    vision = vision_spec(llava_config, projector)
    processor = load_processor_config(tower)
    aspect = "pad" if config.get("image_aspect_ratio", "square") == "pad" else "crop"
    preprocess = preprocess_spec(processor, llava_config.vision_config, aspect)
    if anyres:
        check_anyres_fits(folder, tower, vision, preprocess, "mm_vision_select_feature 'cls_patch'")
    model = build_empty_model(llava_config, depth, dtype, device="meta" if stream else "cpu")
    weights = base or folder
    files = checkpoint_files(weights)
    implied_by = folder / "config.json"
    with_tower = bool(config.get("unfreeze_mm_vision_tower", False))
    tensors = None
    if stream:
        from exporter.graphs.streamed import CheckpointTensors

        # The tower from mm_vision_tower, then the checkpoint, whose fine-tuned tower (with_tower)
        # replaces it: load_tower_weights, then copy_weights, as read one tensor at a time.
        tensors = CheckpointTensors(weight_files(tower), clip_tower_name)
        tensors.add(files, original_names(model, tower=with_tower))
    else:
        load_tower_weights(model, tower, dtype)
        loaded = copy_weights(model, files, original_names(model, tower=with_tower), implied_by)
        for file in trained or []:
            loaded |= copy_weights(model, [file], original_names(model, trained=True), implied_by)
        check_complete(model, loaded, weights if not trained else f"{weights} and {folder}")
    return LlavaSource(
        tensors=tensors,
        path=folder,
        format="original",
        model=model,
        vision=vision,
        text=text_spec(llava_config.text_config, family),
        preprocess=preprocess,
        template=DEFAULT_TEMPLATES[family],
        tokenizer_dir=tokenizer_folder(folder, weights),
        weight_files=files + list(trained or []) + weight_files(tower),
        inputs=[]
        if base is None
        else [SourceInput("base", base, files), SourceInput("vision_tower", tower, weight_files(tower))],
        anyres=anyres,
    )


def tokenizer_folder(folder: Path, base: Path) -> Path:
    """A training output's own tokenizer when it saved one (tokens were added), else the
    base's, as LLaVA's loader takes it."""
    return folder if any((folder / name).is_file() for name in TOKENIZER_FILES) else base


def projector_depth(projector: str, folder: Path) -> int:
    """Number of Linear layers: linear -> 1, mlp{N}x_gelu -> N."""
    match = PROJECTOR_PATTERN.match(projector)
    if not match:
        raise SourceError(
            f"{folder}: unknown mm_projector_type {projector!r} (supported: linear, mlp2x_gelu, mlp{{N}}x_gelu)"
        )
    return int(match.group(2)) if match.group(2) else 1


def resolve_tower(tower_src: str, near: list[Path], explicit: bool) -> Path:
    """--vision-tower as given; mm_vision_tower relative to the model folder first (then to
    the base of a training output), so a model and its tower can ship side by side
    (mm_vision_tower: "../clip")."""
    beside = [folder / tower_src for folder in near if (folder / tower_src).is_dir()]
    if not explicit and not Path(tower_src).is_absolute() and beside:
        tower_src = str(beside[0])
    try:
        folder = resolve_folder(tower_src, what="vision tower", flag="--vision-tower")
    except SourceError as err:
        if explicit:
            raise
        raise SourceError(
            f"cannot load the vision tower {tower_src} named by mm_vision_tower: pass a local CLIP folder with --vision-tower PATH"
        ) from err
    if not (folder / "config.json").is_file():
        raise SourceError(
            f"vision tower {folder} has no config.json: pass a CLIP checkpoint folder with --vision-tower"
        )
    return folder


def text_config_dict(config: dict, family: str) -> dict:
    """The text model's config from an original-format config (a LlamaConfig with mm_* extras)."""
    skip = {"architectures", "auto_map", "transformers_version", "_name_or_path", "torch_dtype", "dtype"}
    text = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in skip}
    text["model_type"] = family
    return text


class SequentialProjector(nn.Sequential):
    """The original repo's projector: Linear, then (GELU, Linear) * (depth - 1).

    Indices match `model.mm_projector.{0,2,4,...}` in original checkpoints. Used for depths the
    transformers LlavaMultiModalProjector (fixed at two layers) cannot express.
    """

    def __init__(self, in_features: int, hidden: int, depth: int):
        layers: list[nn.Module] = [nn.Linear(in_features, hidden)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        super().__init__(*layers)


def build_empty_model(llava_config, depth: int, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    """An uninitialised LlavaForConditionalGeneration (LlavaNextForConditionalGeneration for a
    LlavaNextConfig) in `dtype` (weights are loaded after)."""
    from transformers.initialization import no_init_weights

    _, model_class = hf_classes(llava_config.model_type)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype: no float32 copy of a 7B model
    try:
        with no_init_weights(), torch.device(device):
            model = model_class(llava_config)
            if depth != 2:
                vision_hidden = llava_config.vision_config.hidden_size
                text_hidden = llava_config.text_config.hidden_size
                model.model.multi_modal_projector = SequentialProjector(vision_hidden, text_hidden, depth)
    finally:
        torch.set_default_dtype(previous)
    # transformers builds the CLIP tower in its config's dtype (float32), whatever the default
    return model.to(dtype).eval().requires_grad_(False)


# mlp2x_gelu loads into transformers' LlavaMultiModalProjector, whose layers have names.
MLP2X_NAMES = {"0.": "linear_1.", "2.": "linear_2."}
PEFT_PREFIX = "base_model.model."
ZERO3_HINT = (
    "saved under DeepSpeed ZeRO-3 without gathering its tensors: train with ZeRO-2 "
    "(scripts/zero2.json) or consolidate the checkpoint with DeepSpeed's zero_to_fp32.py"
)


def original_to_hf_key(key: str, tower: bool = False) -> str | None:
    """Maps an original-format weight name to the reference model's; None for ignored keys.
    The tower's weights come from mm_vision_tower, as in LLaVA itself, unless `tower` (the
    trained weights of a training output may hold it: `model.vision_tower.vision_tower.vision_model.*`)."""
    if key.startswith("model.vision_tower."):
        inner = key[len("model.vision_tower.") :].removeprefix("vision_tower.").removeprefix("vision_model.")
        return "model.vision_tower." + inner if tower else None  # transformers 5 drops vision_model.
    if key.startswith("model.mm_projector."):
        return "model.multi_modal_projector." + key[len("model.mm_projector.") :]
    if key == "model.image_newline":  # LLaVA-1.6's row end: the LLaVA model's, not the language model's
        return key
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    if key.startswith("lm_head."):
        return key
    return None


def original_names(model: nn.Module, trained: bool = False, tower: bool = False):
    """name -> the reference's parameter name (or None: ignored), for original-format weights;
    `trained`: the keys of a training output (PEFT's prefix, the tower kept); `tower`: the
    tower's keys kept (a checkpoint whose tower was fine-tuned: unfreeze_mm_vision_tower)."""
    uses_mlp2x = not isinstance(model.model.multi_modal_projector, SequentialProjector)

    def name_of(key: str) -> str | None:
        name = original_to_hf_key(key.removeprefix(PEFT_PREFIX) if trained else key, tower=trained or tower)
        if uses_mlp2x and name and name.startswith("model.multi_modal_projector."):
            suffix = name[len("model.multi_modal_projector.") :]
            for index, named in MLP2X_NAMES.items():
                if suffix.startswith(index):
                    return "model.multi_modal_projector." + named + suffix[len(index) :]
        return name

    return name_of


def copy_weights(model: nn.Module, files: list[Path], name_of, implied_by: Path) -> set[str]:
    """Copies every tensor shard by shard into the model (peak memory: model + one shard);
    returns the reference names it filled. `implied_by`: the config the shapes come from."""
    params = model.state_dict(keep_vars=True)  # persistent tensors only
    loaded: set[str] = set()
    for file in files:
        for key, tensor in iter_checkpoint(file):
            name = name_of(key)
            if name is None:
                continue
            if name not in params:
                raise SourceError(
                    f"{file}: weight {key} has no place in the model (config and weights disagree)"
                )
            if tensor.numel() == 0 and params[name].numel() > 0:
                raise SourceError(f"{file}: weight {key} is empty: the checkpoint was {ZERO3_HINT}")
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise SourceError(
                    f"{file}: weight {key} has shape {tuple(tensor.shape)}, {implied_by} implies {tuple(params[name].shape)}"
                )
            params[name].data.copy_(tensor)
            loaded.add(name)
    return loaded


def check_complete(model: nn.Module, loaded: set[str], where) -> None:
    """Every decoder and projector weight was loaded (the tower loads on its own)."""
    expected = {name for name in model.state_dict() if not name.startswith("model.vision_tower.")}
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - loaded)
    if missing:
        raise SourceError(
            f"{where}: weights missing from the checkpoint, e.g. {missing[0]} ({len(missing)} in all)"
        )
    if model.config.tie_word_embeddings:
        model.tie_weights()


def load_tower_weights(model: nn.Module, tower: Path, dtype: torch.dtype) -> None:
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel.from_pretrained(tower, dtype=dtype)
    missing, unexpected = model.model.vision_tower.load_state_dict(clip.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise SourceError(
            f"vision tower {tower} does not fit the model config (e.g. {(missing or unexpected)[0]})"
        )


def clip_tower_name(key: str) -> str:
    """A separate CLIP checkpoint's key -> the reference's tower name: a CLIPVisionModel's as
    transformers 5 saves it (`embeddings.*`), or with the `vision_model.` of older saves and of
    a whole CLIPModel (whose text tower's names the reference never asks for)."""
    return "model.vision_tower." + key.removeprefix("vision_model.")


def load_vision_weights(source: LlavaSource) -> None:
    """A streamed source's (load_source stream_decoder) vision side onto the CPU, read from
    source.tensors in the dtype the model was built in: the CLIP tower, the projector and
    LLaVA-1.6's image_newline, what the vision graph and its parity check run. The language
    model and lm_head stay on meta: graphs/streamed.py reads their weights as it quantizes them."""
    from transformers.initialization import no_init_weights

    llava = source.model.model
    meta_tower = llava.vision_tower
    # The tower is built afresh on the CPU by its own __init__ rather than moved off meta
    # (to_empty): its non-persistent buffers (CLIP's position_ids) are in no checkpoint, and
    # one built on meta has no value; __init__ makes each as a loaded source has it, whatever
    # the tower's class. Its config is the reference's (eager attention already set on it).
    with no_init_weights(), torch.device("cpu"):
        tower = type(meta_tower)(meta_tower.config)
    tower.to(next(meta_tower.parameters()).dtype)
    read_parameters(tower, meta_tower.state_dict(), "model.vision_tower.", source.tensors)
    llava.vision_tower = tower.eval().requires_grad_(False)
    # The projector has parameters only (Linear layers): they are assigned in place of the meta ones.
    projector = llava.multi_modal_projector
    read_parameters(projector, projector.state_dict(), "model.multi_modal_projector.", source.tensors)
    if source.anyres is not None:
        newline = llava.image_newline
        value = source.tensors.get("model.image_newline")
        check_shape("model.image_newline", value, newline)
        llava.image_newline = nn.Parameter(value.to(newline.dtype), requires_grad=False)


def read_parameters(module: nn.Module, expected: dict, prefix: str, tensors) -> None:
    """Assigns `module` each of its persistent tensors, `prefix` + name, from `tensors` in the
    dtype of `expected` (the meta model's state dict: names, shapes and dtypes)."""
    state = {}
    for name, like in expected.items():
        value = tensors.get(prefix + name)
        check_shape(prefix + name, value, like)
        state[name] = value.to(like.dtype)
    module.load_state_dict(state, assign=True)


def check_shape(name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    if tuple(value.shape) != tuple(like.shape):
        raise SourceError(
            f"weight {name} has shape {tuple(value.shape)} in the checkpoint, the model config implies {tuple(like.shape)}"
        )


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight shards of an original-format checkpoint, via its index if it has one."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json(index, "weight index").get("weight_map", {})
            files = [folder / name for name in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise SourceError(f"{folder}: shard {absent[0]} listed in {index_name} is missing")
            return files
    files = weight_files(folder)
    if not files:
        raise SourceError(f"{folder} has no weights (*.safetensors or pytorch_model*.bin)")
    return files


def weight_files(folder: Path) -> list[Path]:
    safetensors = sorted(folder.glob("*.safetensors"))
    return safetensors or sorted(folder.glob("pytorch_model*.bin"))


def iter_checkpoint(file: Path):
    """Yields (name, tensor) from one shard without unpickling code (.bin) or reading it all."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)
        return
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise SourceError(f"{file} cannot be read as a weights file ({str(err).splitlines()[0]})") from None
    yield from state.items()


# ---------------------------------------------------------------------------------------------
# LLaVA-1.6 ("anyres")

ANYRES = "anyres"
# What an anyres model may have (parity_tests/test_next_parity.py holds a case for each): every
# text family; the patch features only (check_anyres_fits).
ANYRES_FAMILIES = SUPPORTED_FAMILIES
ANYRES_STRATEGIES = ("default",)
# The later LLaVA-NeXT repo's pinpoint range, "(1x1),...,(6x6)": grids, not pixels.
PINPOINT_RANGE = re.compile(r"\(\s*\d+\s*x\s*\d+\s*\)")


def original_anyres(folder: Path, config: dict, tile: int) -> AnyresSpec | None:
    """The tiling of an original-format config with image_aspect_ratio "anyres" (None for any
    other ratio); refuses what LLaVA-1.6's code does not run: another patch merge, and the later
    LLaVA-NeXT repo's "anyres_max_N" and pinpoint range."""
    ratio = config.get("image_aspect_ratio")
    if not (isinstance(ratio, str) and ratio.startswith(ANYRES)):
        return None
    if ratio != ANYRES:
        raise SourceError(
            f"{folder}: image_aspect_ratio {ratio!r} (the later LLaVA-NeXT repo's) is not supported: "
            "only LLaVA-1.6's 'anyres' is"
        )
    merge = config.get("mm_patch_merge_type", "flat")
    if merge != MERGE_SPATIAL_UNPAD:
        raise SourceError(
            f"{folder}: mm_patch_merge_type {merge!r} with image_aspect_ratio 'anyres' is not supported "
            f"(only {MERGE_SPATIAL_UNPAD!r}, LLaVA-1.6's)"
        )
    written = config.get("image_grid_pinpoints")
    if written is None:
        raise SourceError(
            f"{folder}: image_aspect_ratio 'anyres' without image_grid_pinpoints: add the (width, height) pinpoints"
        )
    if isinstance(written, str):
        written = parse_pinpoints(folder, written)
    return anyres_spec(folder, written, tile, width_first=True)


def parse_pinpoints(folder: Path, text: str):
    """Pinpoints written as a string, "[(336, 672), (672, 336), ...]", read as the original repo
    reads them (ast.literal_eval)."""
    if PINPOINT_RANGE.search(text):
        raise SourceError(
            f"{folder}: image_grid_pinpoints {text!r} (the later LLaVA-NeXT repo's range form) is not "
            "supported: list LLaVA-1.6's (width, height) pinpoints in pixels"
        )
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise SourceError(
            f"{folder}: image_grid_pinpoints {text!r} is not a list of (width, height) pairs"
        ) from None


def anyres_spec(folder: Path, written, tile: int, width_first: bool) -> AnyresSpec:
    """The AnyresSpec of pinpoints as a config writes them: [height, width] pairs (HF's), or
    [width, height] (`width_first`: the original repo's), swapped pair by pair in the list's
    order, so that select_best_resolution keeps the same first of equally good pinpoints. Each
    must be whole `tile`-pixel tiles: the original repo's grid and its tiles disagree otherwise
    (haotian-liu/LLaVA#1300)."""
    order = "(width, height)" if width_first else "(height, width)"
    if not (isinstance(written, (list, tuple)) and written and all(map(is_pixel_pair, written))):
        raise SourceError(
            f"{folder}: image_grid_pinpoints {written!r} is not a list of {order} pairs in pixels"
        )
    uneven = [point for point in written if point[0] % tile or point[1] % tile]
    if uneven:
        raise SourceError(
            f"{folder}: image_grid_pinpoints entry {list(uneven[0])} {order} is not in whole {tile}-pixel tiles "
            f"(the vision tower's image_size), which the original LLaVA code breaks on "
            f"(haotian-liu/LLaVA#1300): make every pinpoint a multiple of {tile}"
        )
    return AnyresSpec([[b, a] if width_first else [a, b] for a, b in written], tile_size=tile)


def is_pixel_pair(point) -> bool:
    return (
        isinstance(point, (list, tuple))
        and len(point) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in point)
    )


def check_anyres_fits(
    folder: Path, processor_folder: Path, vision: VisionSpec, preprocess: PreprocessSpec, cls_setting: str
) -> None:
    """What anyres asks of the tower: patch features only (the CLS token does not fit the tile
    grid: transformers' pack_image_features and the original repo's assert both fail on it),
    and an image processor whose resize and crop are the tower's image_size (the tiles and the
    base tile are cut at those sizes and go to the tower as they are)."""
    if vision.select_strategy not in ANYRES_STRATEGIES:
        raise SourceError(
            f"{folder}: {cls_setting} (the CLS token kept) is not supported with anyres: the CLS token does "
            "not fit the tile grid; select the patch features only"
        )
    sizes = (preprocess.shortest_edge, preprocess.crop_size)
    if sizes != (vision.image_size, vision.image_size):
        raise SourceError(
            f"{processor_folder / 'preprocessor_config.json'}: shortest_edge {sizes[0]} and crop size {sizes[1]} "
            f"must both be the vision tower's image_size {vision.image_size} for anyres tiles"
        )


# ---------------------------------------------------------------------------------------------
# The normalized description


def check_feature_layer(folder: Path, layer) -> None:
    if not isinstance(layer, int):
        raise SourceError(f"{folder}: several vision feature layers {layer} are not supported: select one")


def text_family(model_type: str) -> str:
    if model_type not in SUPPORTED_FAMILIES:
        raise SourceError(
            f"decoder family {model_type!r} is not supported (supported: {', '.join(SUPPORTED_FAMILIES)})"
        )
    return model_type


def vision_spec(llava_config, projector: str) -> VisionSpec:
    vision = llava_config.vision_config
    return VisionSpec(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        hidden_size=vision.hidden_size,
        num_layers=vision.num_hidden_layers,
        select_layer=llava_config.vision_feature_layer,
        select_strategy=llava_config.vision_feature_select_strategy,
        projector=projector,
    )


def text_spec(text_config, family: str) -> TextSpec:
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return TextSpec(
        family=family,
        hidden_size=text_config.hidden_size,
        num_layers=text_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=text_config.vocab_size,
        max_positions=text_config.max_position_embeddings,
    )


def preprocess_spec(processor: dict, vision_config, aspect: str) -> PreprocessSpec:
    size = processor.get("size", {}) or {}
    crop = processor.get("crop_size", {}) or {}
    shortest = (
        size.get("shortest_edge", size.get("height", vision_config.image_size))
        if isinstance(size, dict)
        else size
    )
    crop_size = crop.get("height", vision_config.image_size) if isinstance(crop, dict) else crop
    return PreprocessSpec(
        shortest_edge=int(shortest),
        crop_size=int(crop_size),
        mean=[float(x) for x in processor.get("image_mean", OPENAI_CLIP_MEAN)],
        std=[float(x) for x in processor.get("image_std", OPENAI_CLIP_STD)],
        aspect=aspect,
        rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
    )
