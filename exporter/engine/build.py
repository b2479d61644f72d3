"""`llava-export engine`: TensorRT engines for the GPU this runs on, from an artifact folder's ONNX.

    DIR/engines/<gpu>-sm<cc>-trt<version>/vision.plan, decoder.plan, engine.json

Steps: read the manifest; derive and check the optimization profiles (runtime.engines); check
every node's operator against the TensorRT ONNX parser's list (exporter.engine.trt_ops) and that each
.onnx is the one the manifest describes; then, with TensorRT, for each graph: parse the ONNX
(external weights beside it) into a strongly typed network (precision comes from the graph:
an --fp16 export gives a float16 engine; TensorRT 11 has no other way, and on 10 we ask for
the same), add the profiles, build with the shared timing cache, serialize. Everything is
written into DIR/engines/.staging-<name>/ and renamed into place at the end, engine.json
last, so an interrupted build leaves no engine folder that looks finished.

The timing cache (kernel timings, per GPU and TensorRT version) makes rebuilds and builds of
other models with the same layer shapes much faster; it lives outside the artifact folder by
default (~/.cache/llava-export/) and is saved after each engine.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from exporter.engine import trt_ops
from exporter.graphs import quantize
from exporter.progress import Progress
from runtime import contract, engines
from runtime.contract import Manifest
from runtime.engines import EngineLimits, GpuIdentity, Profile
from runtime.errors import ArtifactError, EngineError


@dataclass
class EnginePlan:
    """What `llava-export engine` will build: checked without TensorRT (and without a GPU)."""

    artifacts: Path
    manifest: Manifest
    limits: EngineLimits
    profiles: dict[str, list[Profile]]  # "vision" | "decoder" -> profiles in builder order
    sources: dict[str, str]  # graph -> sha256 of its .onnx

    def describe(self) -> list[str]:
        lines = [
            f"limits: batch <= {self.limits.max_batch}, prompt <= {self.limits.max_input_len} tokens "
            f"(an image is {engines.max_image_tokens(self.manifest)}{' at most' if self.manifest.anyres else ''}), prompt + answer <= {self.limits.max_seq_len}"
        ]

        def span(r, axis: int) -> str:
            values = (r.min[axis], r.opt[axis], r.max[axis])
            return str(values[0]) if len(set(values)) == 1 else "..".join(map(str, values))

        unit = "tiles" if self.manifest.anyres else "images"  # anyres: an image is several tiles
        for profile in self.profiles["vision"]:
            r = profile.shapes[contract.PIXEL_VALUES]
            lines.append(f"profile vision/{profile.name}: {unit} {span(r, 0)} (min..opt..max)")
        for profile in self.profiles["decoder"]:
            embeds, past = profile.shapes[contract.INPUTS_EMBEDS], profile.shapes[contract.past_key_name(0)]
            lines.append(
                f"profile decoder/{profile.name}: batch {span(embeds, 0)}, new tokens {span(embeds, 1)}, cached {span(past, 2)}"
            )
        return lines


def plan_engines(
    artifacts: Path,
    max_batch: int | None = None,
    max_input_len: int | None = None,
    max_seq_len: int | None = None,
    tensorrt_version: str | None = None,
    progress: Progress | None = None,
) -> EnginePlan:
    """Everything that can be checked before TensorRT: manifest, limits, profiles, operators,
    and that each .onnx is the one the manifest describes."""
    progress = progress or Progress()
    artifacts = Path(artifacts)
    manifest = contract.read_manifest(artifacts)
    for graph in engines.GRAPHS:
        if graph not in manifest.graphs:
            raise ArtifactError(
                f"{artifacts} has no {graph} graph: export it with `llava-export all --out {artifacts}`"
            )
        if not (artifacts / manifest.graphs[graph].file).is_file():
            raise ArtifactError(
                f"{artifacts / manifest.graphs[graph].file} is missing: re-export with `llava-export all --out {artifacts}`"
            )
    refusal = onnx_runtime_only(manifest.graphs["decoder"])
    if refusal:
        raise EngineError(refusal)
    limits = engines.derive_limits(manifest, max_batch, max_input_len, max_seq_len)
    profiles = {
        "vision": engines.vision_profiles(manifest, limits),
        "decoder": engines.decoder_profiles(manifest, limits),
    }
    for graph in engines.GRAPHS:
        problems = engines.profile_problems(manifest, limits, graph, profiles[graph])
        if problems:
            raise EngineError(
                f"the {graph} profiles derived from {artifacts} are invalid: {'; '.join(problems)}"
            )
    sources = {}
    with progress.stage("checking the ONNX files against the manifest"):
        for graph in engines.GRAPHS:
            path = artifacts / manifest.graphs[graph].file
            sources[graph] = contract.file_sha256(path)
            if sources[graph] != manifest.graphs[graph].sha256:
                raise ArtifactError(
                    f"{path} is not the graph its manifest describes (sha256 differs): re-export with `llava-export all --out {artifacts}`"
                )
    with progress.stage("checking operators against the TensorRT ONNX parser"):
        for graph in engines.GRAPHS:
            path = artifacts / manifest.graphs[graph].file
            unsupported = trt_ops.unsupported_ops(path, tensorrt_version)
            if unsupported:
                raise EngineError(trt_ops.describe_unsupported(path, unsupported))
    return EnginePlan(artifacts, manifest, limits, profiles, sources)


def onnx_runtime_only(decoder: contract.GraphSpec) -> str | None:
    """Why TensorRT cannot build this decoder (its com.microsoft ops run in ONNX Runtime only),
    or None."""
    if decoder.quant:
        return (
            f"{decoder.file} is quantized for ONNX Runtime (--quant {decoder.quant}: "
            f"{quantize.QUANT_OPS[decoder.quant]}), which TensorRT does not run: export the decoder without --quant for TensorRT"
        )
    if decoder.kv_cache == contract.KV_STATIC:
        return (
            f"{decoder.file} has the static KV cache layout for ONNX Runtime (--kv-cache static: "
            f"com.microsoft.GroupQueryAttention), which TensorRT does not run: export it without --kv-cache for TensorRT"
        )
    return None


def default_timing_cache(identity: GpuIdentity) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "llava-export" / f"timing-{identity.folder_name}.cache"


class BuildProgress:
    """TensorRT's build phases on stderr (an IProgressMonitor): top-level phases with their
    steps, at most one line a second, so a 10-minute decoder build shows that it is alive.
    Ctrl-C cancels the build (the monitor answers False), and the build is reported interrupted."""

    def __init__(self, trt, label: str, progress: Progress):
        base = trt.IProgressMonitor

        class Monitor(base):
            def __init__(inner):
                base.__init__(inner)
                inner.phases: dict[str, tuple[str | None, int]] = {}
                inner.last = 0.0
                inner.cancelled = False
                inner.start = time.perf_counter()

            def phase_start(inner, phase_name, parent_phase, num_steps):
                try:
                    inner.phases[phase_name] = (parent_phase, num_steps)
                    if parent_phase is None:
                        inner.say(f"{phase_name}", force=True)
                except BaseException:
                    inner.cancelled = True

            def step_complete(inner, phase_name, step):
                try:
                    parent, steps = inner.phases.get(phase_name, (None, 0))
                    depth = 0
                    while parent is not None and depth < 4:
                        parent, depth = inner.phases.get(parent, (None, 0))[0], depth + 1
                    if depth <= 1:
                        inner.say(f"{phase_name} {step + 1}/{steps}")
                except BaseException:  # KeyboardInterrupt lands here, inside TensorRT's build
                    inner.cancelled = True
                return not inner.cancelled

            def phase_finish(inner, phase_name):
                try:
                    inner.phases.pop(phase_name, None)
                except BaseException:
                    inner.cancelled = True

            def say(inner, text, force=False):
                now = time.perf_counter()
                if force or now - inner.last >= 1.0:
                    inner.last = now
                    progress.say(f"    [{label} {now - inner.start:5.0f} s] {text}")

        self.monitor = Monitor()


def network_flags(trt) -> int:
    """STRONGLY_TYPED: tensor types come from the ONNX graph (required on TensorRT 11, where
    the flag is accepted and the default; opted into on 10)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise EngineError(
            f"TensorRT {trt.__version__} cannot build strongly typed networks: install TensorRT 10 or 11"
        )
    return 1 << int(flag)


def parse_errors(parser, path: Path, limit: int = 5) -> str:
    """The parser's errors as one line: node, operator, description."""
    parts = []
    for index in range(min(parser.num_errors, limit)):
        error = parser.get_error(index)
        node = getattr(error, "node_name", lambda: "")() or f"#{error.node()}"
        operator = getattr(error, "node_operator", lambda: "")() or "?"
        parts.append(f"node {node} ({operator}): {error.desc()}")
    more = f" (and {parser.num_errors - limit} more)" if parser.num_errors > limit else ""
    return f"TensorRT's ONNX parser rejected {path.name}: " + "; ".join(parts) + more


class TimingCache:
    """The timing cache file, read once and rewritten (aside, then renamed) after each build."""

    def __init__(self, path: Path, progress: Progress):
        self.path, self.progress = path, progress
        self.data = b""
        if path.is_file():
            try:
                self.data = path.read_bytes()
                progress.say(f"  timing cache: {path} ({len(self.data) // 1024} KiB)")
            except OSError as err:
                progress.say(f"  timing cache {path} unreadable ({err}); starting a new one")
        else:
            progress.say(f"  timing cache: {path} (new)")

    def attach(self, config) -> None:
        try:
            cache = config.create_timing_cache(self.data)
        except Exception:  # a cache from another TensorRT, or a damaged file
            cache = None
        if cache is None and self.data:
            self.progress.say(f"  timing cache {self.path} is not usable here; starting a new one")
            self.data = b""
            cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, False):
            self.progress.say("  (TensorRT refused the timing cache; building without one)")

    def save(self, config) -> None:
        cache = config.get_timing_cache()
        if cache is None:
            return
        self.data = bytes(memoryview(cache.serialize()))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(self.data)
            os.replace(tmp, self.path)
        except OSError as err:
            self.progress.say(f"  could not save the timing cache to {self.path} ({err}); builds still work")


def build_plan(
    trt,
    graph: str,
    path: Path,
    profiles: list[Profile],
    out: Path,
    timing: TimingCache,
    workspace_gb: float | None,
    progress: Progress,
) -> int:
    """Parses `path`, builds one engine with `profiles`, writes it to `out`; returns its size."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    with progress.stage(f"parsing {path.name}"):
        if not parser.parse_from_file(str(path)):
            raise EngineError(parse_errors(parser, path))
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for profile in profiles:
        if set(profile.shapes) != names:
            raise EngineError(
                f"{path.name}'s inputs {sorted(names)} do not match profile {profile.name}: re-export the artifacts"
            )
    config = builder.create_builder_config()
    tf32 = getattr(getattr(trt, "BuilderFlag", None), "TF32", None)
    if tf32 is not None:
        # float32 in the graph means float32: TF32 (TensorRT's default) rounds matmul inputs to
        # 10 mantissa bits, which even a float16 graph feels, in its float32 rotary angles
        # (position x inv_freq is a float32 MatMul: 5e-4 relative error is 0.3 rad at position 600)
        config.clear_flag(tf32)
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for name, r in profile.shapes.items():
            optimization.set_shape(name, r.min, r.opt, r.max)
        config.add_optimization_profile(optimization)
    timing.attach(config)
    monitor = BuildProgress(trt, graph, progress).monitor
    config.progress_monitor = monitor
    progress.say(
        f"  building the {graph} engine ({len(profiles)} profile{'s' * (len(profiles) > 1)}; minutes for a 7B decoder)"
    )
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if monitor.cancelled:
        raise KeyboardInterrupt
    if serialized is None:
        raise EngineError(
            f"TensorRT could not build the {graph} engine from {path.name} (its messages above say why)"
        )
    timing.save(config)
    with open(out, "wb") as handle:
        handle.write(memoryview(serialized))
    size = out.stat().st_size
    progress.say(f"  {graph} engine: {size / 2**20:.1f} MiB in {time.perf_counter() - start:.0f} s")
    return size


def gpu_and_tensorrt():
    """(tensorrt module, GpuIdentity of this machine); EngineError when either is missing."""
    from runtime.backends.trt import Cuda, gpu_identity, import_tensorrt

    trt = import_tensorrt()
    return trt, gpu_identity(Cuda(), trt)


def build_engines(
    artifacts: Path,
    max_batch: int | None = None,
    max_input_len: int | None = None,
    max_seq_len: int | None = None,
    timing_cache: Path | None = None,
    workspace_gb: float | None = None,
    progress: Progress | None = None,
) -> Path:
    """Builds DIR/engines/<gpu>-sm<cc>-trt<version>/ for this GPU; returns that folder."""
    progress = progress or Progress()
    artifacts = Path(artifacts)
    plan = plan_engines(artifacts, max_batch, max_input_len, max_seq_len, progress=progress)
    trt, identity = gpu_and_tensorrt()
    unsupported = {
        g: trt_ops.unsupported_ops(artifacts / plan.manifest.graphs[g].file, identity.tensorrt)
        for g in engines.GRAPHS
    }
    for graph, problems in unsupported.items():
        if problems:
            raise EngineError(
                trt_ops.describe_unsupported(artifacts / plan.manifest.graphs[graph].file, problems)
            )
    progress.say(f"  for {identity.describe()}")
    for line in plan.describe():
        progress.say(f"  {line}")
    for graph in engines.GRAPHS:
        if plan.manifest.graphs[graph].dtype == "float32":
            progress.say(
                f"  note: {graph}.onnx is float32, so is its engine (export with --fp16 for a float16 engine)"
            )
    root = artifacts / contract.ENGINES_DIR
    final = root / identity.folder_name
    stage = root / f".staging-{identity.folder_name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
    except OSError as err:
        raise EngineError(f"cannot write engines into {root} ({err.strerror or err})") from None
    timing = TimingCache(Path(timing_cache) if timing_cache else default_timing_cache(identity), progress)
    try:
        sizes, seconds = {}, {}
        for graph in engines.GRAPHS:
            start = time.perf_counter()
            path = artifacts / plan.manifest.graphs[graph].file
            sizes[graph] = build_plan(
                trt,
                graph,
                path,
                plan.profiles[graph],
                stage / engines.PLANS[graph],
                timing,
                workspace_gb,
                progress,
            )
            seconds[graph] = round(time.perf_counter() - start, 1)
        extra = {
            "build_seconds": seconds,
            "tf32": False,
            "timing_cache": str(timing.path),
            "tools": tool_versions(trt),
        }
        record = engines.engine_record(
            identity, plan.manifest, plan.limits, plan.profiles, plan.sources, sizes, extra
        )
        engines.write_engine_json(stage, record)
        replace_folder(stage, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final


def replace_folder(stage: Path, final: Path) -> None:
    """Moves the finished staging folder to `final`, replacing an older build of it."""
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    shutil.rmtree(old, ignore_errors=True)


def tool_versions(trt) -> dict[str, str]:
    from importlib import metadata

    versions = {"tensorrt": str(trt.__version__), "python": sys.version.split()[0]}
    try:
        versions["llava-export"] = metadata.version("llava-export")
    except metadata.PackageNotFoundError:
        pass
    return versions
