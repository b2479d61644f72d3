"""TensorRT engine folders: their names, the profiles they are built with, and choosing the
one that runs here. Pure: no tensorrt or CUDA import, so it is shared by `llava-export engine`
(which writes folders) and the TensorRT backend (which selects one), and unit-tested anywhere.

    DIR/engines/<gpu>-sm<cc>-trt<version>/
        vision.plan       pixel_values -> image_embeds
        decoder.plan      the decoder graph, two optimization profiles (prefill, decode)
        engine.json       what it was built from and for (ENGINE_FORMAT below)

A plan runs only on the GPU model and the TensorRT version that built it, hence one folder
per (GPU, compute capability, TensorRT version); several can live side by side. engine.json
records the sha256 of the ONNX files it was built from, so an engine left over from an
earlier export is refused as stale instead of running other weights.

Profiles (docs/tensorrt.md says why two for the decoder):

    vision   pixel_values      [1..B*T, 3, H, W]                     opt one image's T tiles
                               (T = 1 for LLaVA-1.5; anyres: the base tile + the largest grid)
    prefill  inputs_embeds     [1..B, 1..max_input_len, hidden]      past_sequence = 0
    decode   inputs_embeds     [1..B, 1, hidden]                     past 1..max_seq_len-1
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime import anyres, contract
from runtime.contract import Manifest
from runtime.errors import EngineError

ENGINE_FORMAT = "llava-export-engine"
ENGINE_FORMAT_VERSION = 1
ENGINE_JSON = "engine.json"
PLANS = {"vision": "vision.plan", "decoder": "decoder.plan"}
GRAPHS = ("vision", "decoder")

VISION_PROFILE = "images"
PREFILL = "prefill"  # past_sequence = 0, the whole prompt at once
DECODE = "decode"  # sequence = 1, past_sequence >= 1

# Defaults when `llava-export engine` is given no limits.
DEFAULT_MAX_BATCH = 1
DEFAULT_MAX_SEQ_LEN = 4096  # capped by the model's max_positions
DEFAULT_TEXT_TOKENS = 1024  # prompt text allowed next to one image by default
OPT_TEXT_TOKENS = 64  # a typical question: the prefill profile's opt length is one image + this
OPT_ANSWER_TOKENS = 128  # the decode profile's opt past length is the opt prompt + this


def rebuild_command(folder: str | os.PathLike) -> str:
    return f"llava-export engine --artifacts {folder}"


def slug(text: str) -> str:
    """'NVIDIA H200 NVL' -> 'nvidia-h200-nvl': safe in a folder name, stable across drivers."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "gpu"


# ---------------------------------------------------------------------------------------------
# Where an engine runs


@dataclass(frozen=True)
class GpuIdentity:
    """The GPU and TensorRT version an engine is built for (and the only ones it runs on)."""

    name: str  # as CUDA reports it, e.g. "NVIDIA H200"
    major: int  # compute capability, e.g. 9
    minor: int  # e.g. 0
    tensorrt: str  # tensorrt.__version__, e.g. "10.13.3.9"

    @property
    def compute_capability(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def folder_name(self) -> str:
        return f"{slug(self.name)}-sm{self.major}{self.minor}-trt{self.tensorrt}"

    def describe(self) -> str:
        return f"{self.name} (sm{self.major}{self.minor}) with TensorRT {self.tensorrt}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "compute_capability": self.compute_capability,
            "tensorrt_version": self.tensorrt,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> GpuIdentity:
        major, minor = str(record["gpu"]["compute_capability"]).split(".")
        return cls(record["gpu"]["name"], int(major), int(minor), str(record["tensorrt_version"]))


# ---------------------------------------------------------------------------------------------
# Limits and profiles


@dataclass(frozen=True)
class EngineLimits:
    """The largest shapes an engine takes. max_input_len counts a prompt's tokens with its
    images' tokens; max_seq_len is prompt plus answer (the KV cache's capacity)."""

    max_batch: int
    max_input_len: int
    max_seq_len: int


def max_image_tokens(manifest: Manifest) -> int:
    """The most embeddings one image can stand for: N_img (LLaVA-1.5), or under anyres
    anyres.max_image_token_count."""
    if manifest.anyres is None:
        return manifest.vision.num_image_tokens
    return anyres.max_image_token_count(manifest.anyres, manifest.vision)


def tiles_per_image(manifest: Manifest) -> int:
    """The vision graph's batch for one image at most: 1, or under anyres spec.max_tiles."""
    return 1 if manifest.anyres is None else manifest.anyres.max_tiles


def derive_limits(
    manifest: Manifest,
    max_batch: int | None = None,
    max_input_len: int | None = None,
    max_seq_len: int | None = None,
) -> EngineLimits:
    """Fills in defaults from the manifest and checks the flags; EngineError names the flag."""
    image_tokens = max_image_tokens(manifest)
    positions = manifest.text.max_positions
    max_batch = DEFAULT_MAX_BATCH if max_batch is None else max_batch
    max_seq_len = min(DEFAULT_MAX_SEQ_LEN, positions) if max_seq_len is None else max_seq_len
    max_input_len = (
        min(image_tokens + DEFAULT_TEXT_TOKENS, max_seq_len) if max_input_len is None else max_input_len
    )
    if max_batch < 1:
        raise EngineError(f"--max-batch must be at least 1, not {max_batch}")
    if max_seq_len > positions:
        raise EngineError(f"--max-seq-len {max_seq_len} is beyond the model's {positions} positions")
    if max_seq_len < 2:
        raise EngineError(
            f"--max-seq-len must be at least 2 (a prompt token and an answer token), not {max_seq_len}"
        )
    if max_input_len > max_seq_len:
        raise EngineError(f"--max-input-len {max_input_len} is longer than --max-seq-len {max_seq_len}")
    if max_input_len < image_tokens + 1:
        raise EngineError(
            f"--max-input-len {max_input_len} cannot hold one image ({image_tokens} tokens) and a word of text: "
            f"use at least {image_tokens + 1}"
        )
    return EngineLimits(max_batch, max_input_len, max_seq_len)


@dataclass(frozen=True)
class ShapeRange:
    """One input's min / opt / max shape in an optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def problems(self) -> list[str]:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            return [f"ranks differ: min {self.min}, opt {self.opt}, max {self.max}"]
        problems = [f"negative size in {self.min}" for d in self.min if d < 0][:1]
        for axis, (low, mid, high) in enumerate(zip(self.min, self.opt, self.max)):
            if not low <= mid <= high:
                problems.append(f"axis {axis}: min {low} <= opt {mid} <= max {high} does not hold")
        return problems

    def contains(self, shape: Iterable[int]) -> bool:
        shape = tuple(shape)
        return len(shape) == len(self.min) and all(
            lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max)
        )

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: dict[str, list[int]]) -> ShapeRange:
        return cls(tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))


@dataclass(frozen=True)
class Profile:
    """A named optimization profile: every input of the graph -> its ShapeRange."""

    name: str
    shapes: dict[str, ShapeRange]

    def problems(self) -> list[str]:
        return [
            f"profile {self.name}, {input_name}: {p}"
            for input_name, r in self.shapes.items()
            for p in r.problems()
        ]

    def contains(self, shapes: dict[str, Iterable[int]], partial: bool = False) -> bool:
        """Every input's shape in range; `partial`: only the inputs given (which must exist)."""
        names = set(shapes)
        if not (names <= set(self.shapes) if partial else names == set(self.shapes)):
            return False
        return all(self.shapes[n].contains(s) for n, s in shapes.items())

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {n: r.as_dict() for n, r in self.shapes.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        return cls(data["name"], {n: ShapeRange.from_dict(r) for n, r in data["shapes"].items()})


def vision_profiles(manifest: Manifest, limits: EngineLimits) -> list[Profile]:
    """One profile over the tile batch: opt one image's tiles (one image per request is the
    common case), max those of max_batch images; more are encoded in chunks of that."""
    size, tiles = manifest.preprocess.crop_size, tiles_per_image(manifest)
    pixels = ShapeRange((1, 3, size, size), (tiles, 3, size, size), (limits.max_batch * tiles, 3, size, size))
    return [Profile(VISION_PROFILE, {contract.PIXEL_VALUES: pixels})]


def opt_lengths(manifest: Manifest, limits: EngineLimits) -> tuple[int, int]:
    """(prefill opt sequence, decode opt past): one image and a short question, then a short answer."""
    prompt = min(max_image_tokens(manifest) + OPT_TEXT_TOKENS, limits.max_input_len)
    past = max(1, min(prompt + OPT_ANSWER_TOKENS, limits.max_seq_len - 1))
    return prompt, past


def decoder_profiles(manifest: Manifest, limits: EngineLimits) -> list[Profile]:
    """[prefill, decode], in the order they are added to the builder (profile index 0, 1)."""
    text = manifest.text
    batch, hidden, kv = limits.max_batch, text.hidden_size, (text.num_kv_heads, text.head_dim)
    prompt_opt, past_opt = opt_lengths(manifest, limits)

    def shapes(sequence: tuple[int, int, int], past: tuple[int, int, int]) -> dict[str, ShapeRange]:
        # sequence/past: (min, opt, max) of S and P; the mask covers P + S
        ranges = {
            contract.INPUTS_EMBEDS: ShapeRange(
                (1, sequence[0], hidden), (1, sequence[1], hidden), (batch, sequence[2], hidden)
            ),
            contract.ATTENTION_MASK: ShapeRange(
                (1, past[0] + sequence[0]), (1, past[1] + sequence[1]), (batch, past[2] + sequence[2])
            ),
            contract.POSITION_IDS: ShapeRange((1, sequence[0]), (1, sequence[1]), (batch, sequence[2])),
        }
        cache = ShapeRange(
            (1, kv[0], past[0], kv[1]), (1, kv[0], past[1], kv[1]), (batch, kv[0], past[2], kv[1])
        )
        for name in contract.decoder_input_names(text.num_layers)[3:]:
            ranges[name] = cache
        return ranges

    prefill = Profile(PREFILL, shapes((1, prompt_opt, limits.max_input_len), (0, 0, 0)))
    decode = Profile(DECODE, shapes((1, 1, 1), (1, past_opt, limits.max_seq_len - 1)))
    return [prefill, decode]


def profile_problems(
    manifest: Manifest, limits: EngineLimits, graph: str, profiles: list[Profile]
) -> list[str]:
    """Everything wrong with a graph's profiles: bad ranges, inputs missing or unknown."""
    spec = manifest.graphs[graph]
    problems = []
    for profile in profiles:
        problems += profile.problems()
        missing = set(spec.inputs) - set(profile.shapes)
        unknown = set(profile.shapes) - set(spec.inputs)
        problems += [f"profile {profile.name} has no range for input {n}" for n in sorted(missing)]
        problems += [
            f"profile {profile.name} names {n}, which {spec.file} does not take" for n in sorted(unknown)
        ]
        for name, dims in spec.inputs.items():
            if name not in profile.shapes:
                continue
            for axis, dim in enumerate(dims):
                r = profile.shapes[name]
                if (
                    isinstance(dim, int)
                    and axis < len(r.min)
                    and not (r.min[axis] == r.opt[axis] == r.max[axis] == dim)
                ):
                    problems.append(
                        f"profile {profile.name}, {name}: axis {axis} is fixed at {dim} in the graph"
                    )
    return problems


def find_profile(
    profiles: list[Profile], shapes: dict[str, Iterable[int]], partial: bool = False
) -> int | None:
    """Index of the first profile whose ranges hold every shape, or None. `partial`: `shapes`
    names only some inputs (the decoder's pasts all share one shape: checking one is enough)."""
    for index, profile in enumerate(profiles):
        if profile.contains(shapes, partial):
            return index
    return None


# ---------------------------------------------------------------------------------------------
# engine.json


def engine_record(
    identity: GpuIdentity,
    manifest: Manifest,
    limits: EngineLimits,
    profiles: dict[str, list[Profile]],
    sources: dict[str, str],
    plan_bytes: dict[str, int],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """engine.json's content. sources: graph -> sha256 of the .onnx it was built from (the
    manifest records the same digest, which is how a stale engine is recognised)."""
    return {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        "tensorrt_version": identity.tensorrt,
        "gpu": {"name": identity.name, "compute_capability": identity.compute_capability},
        "strongly_typed": True,
        "limits": asdict(limits),
        "source": {
            "weights_sha256": manifest.source.get("weights_sha256", ""),
            **{
                g: {"file": manifest.graphs[g].file, "sha256": sources[g], "dtype": manifest.graphs[g].dtype}
                for g in GRAPHS
            },
        },
        "plans": {g: {"file": PLANS[g], "bytes": plan_bytes[g]} for g in GRAPHS},
        "profiles": {g: [p.as_dict() for p in profiles[g]] for g in GRAPHS},
        **(extra or {}),
    }


def write_engine_json(folder: Path, record: dict[str, Any]) -> None:
    path = folder / ENGINE_JSON
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def read_engine_json(folder: Path, artifacts: Path) -> dict[str, Any]:
    path = folder / ENGINE_JSON
    rebuild = rebuild_command(artifacts)
    if not path.is_file():
        raise EngineError(
            f"{path} is missing (an interrupted or hand-made engine folder?): rebuild with `{rebuild}`"
        )
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise EngineError(f"{path} is unreadable ({err}): rebuild with `{rebuild}`") from None
    if not isinstance(record, dict) or record.get("format") != ENGINE_FORMAT:
        raise EngineError(f"{path} is not a {ENGINE_FORMAT} record: rebuild with `{rebuild}`")
    if record.get("format_version") != ENGINE_FORMAT_VERSION:
        raise EngineError(
            f"{path} has format version {record.get('format_version')}, this runtime reads {ENGINE_FORMAT_VERSION}: "
            f"rebuild with `{rebuild}`"
        )
    try:
        GpuIdentity.from_record(record)
        EngineLimits(**record["limits"])
        for graph in GRAPHS:
            record["source"][graph]["sha256"]
            record["plans"][graph]["file"]
            [Profile.from_dict(p) for p in record["profiles"][graph]]
    except (KeyError, TypeError, ValueError) as err:
        raise EngineError(f"{path} is incomplete ({err!r}): rebuild with `{rebuild}`") from None
    return record


@dataclass
class EngineFolder:
    """A selected, checked engine folder."""

    path: Path
    record: dict[str, Any]

    @property
    def limits(self) -> EngineLimits:
        return EngineLimits(**self.record["limits"])

    def profiles(self, graph: str) -> list[Profile]:
        return [Profile.from_dict(p) for p in self.record["profiles"][graph]]

    def plan(self, graph: str) -> Path:
        return self.path / self.record["plans"][graph]["file"]


def describe_folder(folder: Path) -> str:
    """What an engine folder was built for, from its engine.json when readable."""
    try:
        return GpuIdentity.from_record(json.loads((folder / ENGINE_JSON).read_text())).describe()
    except (OSError, ValueError, KeyError, TypeError):
        return folder.name


def engine_folders(artifacts: Path) -> list[Path]:
    """Finished engine folders (staging folders start with a dot)."""
    root = artifacts / contract.ENGINES_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def require_engines(artifacts: Path) -> None:
    """EngineError naming the build command when the folder has no engine at all (checked
    before TensorRT is even imported: the first thing a new user needs to hear)."""
    if not engine_folders(Path(artifacts)):
        root = Path(artifacts) / contract.ENGINES_DIR
        raise EngineError(
            f"no TensorRT engine in {root} for this GPU: build one with `{rebuild_command(artifacts)}`"
        )


def select_engine(artifacts: Path, manifest: Manifest, identity: GpuIdentity) -> EngineFolder:
    """The engine folder for this GPU and TensorRT version, checked against the artifacts.

    EngineError (naming the rebuild command) when there is none, when it was built for another
    GPU or TensorRT version, when engine.json is missing or malformed, when a plan is missing
    or truncated, or when the ONNX it was built from is not the ONNX in the folder now."""
    artifacts = Path(artifacts)
    rebuild = rebuild_command(artifacts)
    root = artifacts / contract.ENGINES_DIR
    folders = engine_folders(artifacts)
    if not folders:
        raise EngineError(
            f"no TensorRT engines in {root}: build them for this GPU ({identity.describe()}) with `{rebuild}`"
        )
    folder = root / identity.folder_name
    if not folder.is_dir():
        prefix = f"{slug(identity.name)}-sm{identity.major}{identity.minor}-trt"
        same_gpu = [f for f in folders if f.name.startswith(prefix)]
        if same_gpu:
            versions = ", ".join(f.name[len(prefix) :] for f in same_gpu)
            reason = f"the engines for this GPU were built with TensorRT {versions}, this machine has TensorRT {identity.tensorrt}"
        else:
            reason = f"found engines for {'; '.join(describe_folder(f) for f in folders)}, this machine is {identity.describe()}"
        raise EngineError(
            f"no TensorRT engine in {root} for this GPU and TensorRT version ({reason}); an engine runs only where "
            f"it was built: rebuild with `{rebuild}`"
        )
    record = read_engine_json(folder, artifacts)
    built_for = GpuIdentity.from_record(record)
    if built_for != identity:
        raise EngineError(
            f"{folder / ENGINE_JSON} says it was built for {built_for.describe()}, this machine is {identity.describe()}: "
            f"rebuild with `{rebuild}`"
        )
    weights = record["source"].get("weights_sha256")
    if weights and weights != manifest.source.get("weights_sha256"):
        raise EngineError(
            f"the engines in {folder} were built from other weights than {artifacts} holds now (stale): rebuild with `{rebuild}`"
        )
    for graph in GRAPHS:
        if graph not in manifest.graphs:
            raise EngineError(
                f"{artifacts} has no {graph} graph: export it with `llava-export all --out {artifacts}`"
            )
        if record["source"][graph]["sha256"] != manifest.graphs[graph].sha256:
            raise EngineError(
                f"the engines in {folder} are stale: {manifest.graphs[graph].file} changed since they were built: "
                f"rebuild with `{rebuild}`"
            )
        plan = folder / record["plans"][graph]["file"]
        expected = record["plans"][graph].get("bytes")
        if not plan.is_file():
            raise EngineError(f"{plan} is missing: rebuild with `{rebuild}`")
        if expected is not None and plan.stat().st_size != expected:
            raise EngineError(
                f"{plan} is truncated ({plan.stat().st_size} of {expected} bytes): rebuild with `{rebuild}`"
            )
    return EngineFolder(folder, record)
