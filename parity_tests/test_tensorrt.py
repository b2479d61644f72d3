"""GPU parity: TensorRT engines (and ONNX Runtime's CUDA provider, and float16 PyTorch on CUDA)
against the float32 PyTorch reference. Marked `gpu`; each group skips, saying why, where its
stack is missing (no tensorrt / cuda-python, no CUDA GPU, no CUDAExecutionProvider, no CUDA
torch). scripts/gpu_check.sh runs this file and reports it.

    vision   image_embeds of batches 1 and 3 (3 > --max-batch 2: chunked), cosine per image
             token >= 0.999 in float16 (0.9999 in float32)
    decoder  a left-padded batch of 2 (lengths 6 and 4), prefill then DECODE_STEPS greedy steps
             fed the reference's tokens: logits cosine, and the same top-1 wherever the
             reference's top-2 margin is above the dtype's logit error
    greedy   llava-run's path (Pipeline) against transformers' generate, as
             test_generation_parity.py does for ONNX Runtime on the CPU: identical tokens up
             to the first near tie
    toy      the trained toy model's answers to held-out questions against the PyTorch
             reference's (parity_tests/test_toy_parity.py on the GPU): float32 all identical,
             float16 at least 99%
    next     LLaVA-1.6 (anyres) against transformers' LlavaNextForConditionalGeneration
             (parity_tests/test_next_parity.py on the GPU): the packed image features of four
             images (16 tiles: two vision runs of at most 2 x 5), cosine as for vision; greedy
             answers of a batch of 2 (7 tiles: one run below the profile's max) as for greedy

Engines are built once per dtype for each tiny model (seconds) with --max-batch 2, float32
engines without TF32 (precision comes from the graph).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exporter.bench import gpu_check  # noqa: E402
from exporter.parity import OutputParity, assert_parity, compare  # noqa: E402
from exporter.progress import Progress  # noqa: E402
from exporter.testing.tiny import TinyConfig  # noqa: E402
from runtime import prompts  # noqa: E402
from runtime.pipeline import Pipeline, Request, Timings  # noqa: E402
from tests.support.fixtures import gradient_pictures  # noqa: E402
from tests.support.generation import (  # noqa: E402
    NEW_TOKENS,
    ROWS,
    compare_greedy,
    greedy_with_margins,
    reference_generate,
)
from tests.support.graphs import embeddings, empty_past, pixels, run_decoder, run_vision  # noqa: E402
from tests.support.toy import TOY_HF_DIR, export_with_cli  # noqa: E402

pytestmark = pytest.mark.gpu

DEFAULT = TinyConfig()
MAX_BATCH = 2
DECODE_STEPS = 6
MIN_COSINE = {"float32": 0.9999, "float16": 0.999}
# A greedy pick is comparable where the reference's top-2 margin exceeds the dtype's logit
# error (float32 without TF32: ~1e-5; float16: ~1e-2 on the tiny models).
MARGIN = {"float32": 1e-3, "float16": 0.05}
MIN_GREEDY_STEPS = {"float32": 16, "float16": 2}

TRT = gpu_check.tensorrt_status()
ORT_CUDA = gpu_check.ort_cuda_status()
TORCH_CUDA = gpu_check.torch_cuda_status()
BACKENDS = [
    pytest.param("trt", marks=pytest.mark.skipif(TRT is not None, reason=f"TensorRT parity: {TRT}")),
    pytest.param(
        "ort-cuda",
        marks=pytest.mark.skipif(ORT_CUDA is not None, reason=f"ONNX Runtime CUDA parity: {ORT_CUDA}"),
    ),
]
DTYPES = ["float16", "float32"]


@pytest.fixture(scope="module")
def folders(workshop, tmp_path_factory):
    """(dtype, config) -> a private copy of the tiny export, with engines built when TensorRT is here."""
    made: dict[tuple, object] = {}

    def get(dtype: str, with_engines: bool, config: TinyConfig = DEFAULT):
        key = (dtype, with_engines, repr(config))
        if key not in made:
            source = workshop.artifacts(config, "hf", fp16=dtype == "float16")
            folder = shutil.copytree(source, tmp_path_factory.mktemp(f"gpu-{dtype}") / "artifacts")
            if with_engines:
                from exporter.engine.build import build_engines

                build_engines(
                    folder,
                    max_batch=MAX_BATCH,
                    timing_cache=folder.parent / "timing.cache",
                    progress=Progress(quiet=True),
                )
            made[key] = folder
        return made[key]

    return get


def open_backend(folders, backend: str, dtype: str, config: TinyConfig = DEFAULT):
    folder = folders(dtype, with_engines=backend == "trt", config=config)
    pipe = Pipeline.load(folder, backend="trt" if backend == "trt" else "ort")
    if backend == "ort-cuda":
        assert pipe.backend.name == "ort-cuda", (
            "onnxruntime-gpu is installed but the session fell back to the CPU"
        )
    return pipe


def reference_features(model, pixel_values: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values).pooler_output
    return torch.stack(list(features)).numpy()


def reference_step(model, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache=None):
    with torch.no_grad():
        out = model(
            inputs_embeds=torch.from_numpy(embeds.astype(np.float32)),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
            cache=cache,
            use_cache=True,
        )
    return out.logits[:, -1].float().numpy(), out.cache


def positions_of(mask: np.ndarray, new: int) -> np.ndarray:
    return np.clip(np.cumsum(mask, -1) - 1, 0, None)[:, -new:].astype(np.int64)


def top1_failures(step: str, actual: np.ndarray, expected: np.ndarray, margin: float) -> list[str]:
    top2 = np.sort(expected, axis=-1)[:, -2:]
    confident = (top2[:, 1] - top2[:, 0]) > margin
    wrong = confident & (actual.argmax(-1) != expected.argmax(-1))
    return [
        f"{step} row {row}: top-1 {actual[row].argmax()} vs reference {expected[row].argmax()}"
        for row in np.flatnonzero(wrong)
    ]


# ---------------------------------------------------------------------------------------------
# TensorRT and ONNX Runtime CUDA against PyTorch float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_matches_pytorch(workshop, folders, backend, dtype):
    pipe = open_backend(folders, backend, dtype)
    reference = workshop.reference(DEFAULT)
    results = []
    for batch in (1, 3):
        pix = pixels(DEFAULT, batch, seed=10 + batch)
        actual = pipe.backend.encode_images(pix.numpy())
        assert actual.dtype == np.dtype(dtype)
        results.append(
            compare(
                f"image_embeds batch {batch}",
                actual,
                reference_features(reference, pix),
                min_cosine=MIN_COSINE[dtype],
            )
        )
    assert_parity(results, f"{backend} vision {dtype} vs PyTorch float32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_top1_matches_pytorch(workshop, folders, backend, dtype):
    pipe = open_backend(folders, backend, dtype)
    model = workshop.reference(DEFAULT)
    backend_impl, table = pipe.backend, pipe.embed_table
    rng = np.random.default_rng(3)
    lengths = [6, 4]
    hidden = pipe.manifest.text.hidden_size
    embeds = np.zeros((2, 6, hidden), np.float32)
    mask = np.zeros((2, 6), np.int64)
    for row, length in enumerate(lengths):
        embeds[row, 6 - length :] = table[rng.integers(3, 300, length)]
        mask[row, 6 - length :] = 1
    results: list[OutputParity] = []
    failures: list[str] = []
    cache = backend_impl.empty_cache(2)
    expected, ref_cache = reference_step(model, embeds, mask, positions_of(mask, 6))
    actual, cache = backend_impl.decode(embeds.astype(backend_impl.dtype), mask, positions_of(mask, 6), cache)
    for step in range(DECODE_STEPS + 1):
        label = "prefill" if step == 0 else f"decode {step}"
        results.append(compare(f"logits {label}", actual, expected, min_cosine=MIN_COSINE[dtype], top1=True))
        failures += top1_failures(label, actual, expected, MARGIN[dtype])
        if step == DECODE_STEPS:
            break
        tokens = expected.argmax(-1)  # teacher forcing: both sides continue with the reference's pick
        new = np.asarray(table[tokens])[:, None, :]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        expected, ref_cache = reference_step(
            model, new.astype(np.float32), mask, positions_of(mask, 1), ref_cache
        )
        actual, cache = backend_impl.decode(
            new.astype(backend_impl.dtype), mask, positions_of(mask, 1), cache
        )
    assert_parity(results, f"{backend} decoder {dtype} vs PyTorch float32")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_answers_match_transformers_generate(workshop, folders, backend, dtype, images, capsys):
    pipe = open_backend(folders, backend, dtype)
    pipe.manifest.tokens.eos = []  # no stopping on either side (see test_generation_parity.py)
    model = workshop.reference(DEFAULT)
    paths = [images[name] for _, name in ROWS]
    answers = pipe.generate_batch(
        [Request(prompt, [path]) for (prompt, _), path in zip(ROWS, paths)], max_new_tokens=NEW_TOKENS
    )
    ref_tokens, margins = reference_generate(model, pipe, ROWS, paths)
    report, failures = compare_greedy(
        [a.token_ids for a in answers], ref_tokens, margins, MARGIN[dtype], MIN_GREEDY_STEPS[dtype]
    )
    with capsys.disabled():
        print(f"\n[{backend} {dtype} greedy] " + "; ".join(report))
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# LLaVA-1.6 (anyres): an image is a batch of tiles, packed after the vision engine

NEXT = TinyConfig(anyres=((32, 64), (64, 32), (64, 64), (96, 32), (32, 96)), max_positions=640)
NEXT_TILES = 5  # the most one image takes with these pinpoints (a 64 x 64 grid and the base tile)
# (height, width) -> tiles: 5, 4, 4, 3; all four are 16 tiles, more than one run of MAX_BATCH x 5
NEXT_SIZES = {"square": (70, 70), "wide": (45, 100), "tall": (90, 41), "small": (13, 19)}
NEXT_ROWS = [("What is shown in the image?", "wide"), ("Describe the image in detail.", "small")]


@pytest.fixture(scope="module")
def next_pictures() -> dict:
    return gradient_pictures(NEXT_SIZES)


def next_reference(model, images: list) -> tuple[dict, list[np.ndarray]]:
    """transformers alone: LlavaNextImageProcessorPil's pixel values and image sizes for this
    model's tile and pinpoints, and get_image_features' packed features (one [tokens, hidden]
    per image), in float32."""
    from transformers import LlavaNextImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    size = model.config.vision_config.image_size
    processor = LlavaNextImageProcessorPil(
        image_grid_pinpoints=model.config.image_grid_pinpoints,
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    inputs = processor(images, return_tensors="np")
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=torch.from_numpy(inputs["pixel_values"]),
            image_sizes=torch.from_numpy(inputs["image_sizes"]),
        ).pooler_output
    return inputs, [f.float().numpy() for f in features]


def open_next(folders, backend: str, dtype: str) -> Pipeline:
    pipe = open_backend(folders, backend, dtype, NEXT)
    if backend == "trt":  # the vision profile's max: MAX_BATCH images of the most tiles
        assert pipe.backend.tiles_per_run == MAX_BATCH * NEXT_TILES
    return pipe


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_next_packed_image_features_match_pytorch(workshop, folders, backend, dtype, next_pictures):
    pipe = open_next(folders, backend, dtype)
    images = list(next_pictures.values())
    _, expected = next_reference(workshop.reference(NEXT), images)
    batch = pipe.prepare([Request("<image>" * len(images), images)], max_new_tokens=1)
    assert len(batch.pixel_values) == 16 > MAX_BATCH * NEXT_TILES  # chunked: two vision runs
    ours = pipe.image_embeds(batch, Timings())
    assert [len(o) for o in ours] == [len(e) for e in expected]
    assert all(o.dtype == np.dtype(dtype) for o in ours)
    results = [
        compare(f"packed image_embeds {name}", got, want, min_cosine=MIN_COSINE[dtype])
        for name, got, want in zip(next_pictures, ours, expected)
    ]
    assert_parity(results, f"{backend} LLaVA-1.6 vision {dtype} vs PyTorch float32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_next_greedy_answers_match_transformers_generate(
    workshop, folders, backend, dtype, next_pictures, capsys
):
    pipe = open_next(folders, backend, dtype)
    pipe.manifest.tokens.eos = []  # no stopping on either side
    model = workshop.reference(NEXT)
    images = [next_pictures[name] for _, name in NEXT_ROWS]
    answers = pipe.generate_batch(
        [Request(prompt, [image]) for (prompt, _), image in zip(NEXT_ROWS, images)],
        max_new_tokens=NEW_TOKENS,
    )
    inputs, features = next_reference(model, images)
    assert sum(len(pixels) for pixels in inputs["pixel_values"]) >= 7  # 4 + 3 tiles (and padding)
    sequences = []
    for (prompt, _), feature in zip(NEXT_ROWS, features):
        text = prompts.render_prompt(pipe.manifest.template, prompt, 1)
        before, after = prompts.tokenize_prompt(pipe.tokenizer, text, pipe.manifest.tokens.bos)
        sequences.append([*before, *[model.config.image_token_index] * len(feature), *after])
    ref_tokens, margins = greedy_with_margins(
        model,
        sequences,
        pipe.manifest.tokens.pad,
        NEW_TOKENS,
        pixel_values=inputs["pixel_values"],
        image_sizes=inputs["image_sizes"],
    )
    report, failures = compare_greedy(
        [a.token_ids for a in answers], ref_tokens, margins, MARGIN[dtype], MIN_GREEDY_STEPS[dtype]
    )
    with capsys.disabled():
        print(f"\n[{backend} {dtype} LLaVA-1.6 greedy] " + "; ".join(report))
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# float16 on CUDA in PyTorch: the ONNX float16 graphs against PyTorch's own float16 arithmetic


@pytest.mark.skipif(TORCH_CUDA is not None, reason=f"float16 PyTorch-on-CUDA parity: {TORCH_CUDA}")
def test_fp16_onnx_matches_pytorch_fp16_on_cuda(workshop):
    """Where neither TensorRT nor ONNX Runtime CUDA is installed this still uses the GPU: the
    float16 graphs (ONNX Runtime) against the same model run in float16 by PyTorch on CUDA,
    the arithmetic a GPU deployment of the reference would do."""
    from exporter.source import load_source

    folder = workshop.artifacts(DEFAULT, "hf", fp16=True)
    model = load_source(str(workshop.tiny(DEFAULT)["hf"]), dtype=torch.float16).model.to("cuda").eval()
    results = []
    pix = pixels(DEFAULT, 3, seed=21)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pix.to("cuda", torch.float16)).pooler_output
    expected = torch.stack(list(features)).float().cpu().numpy()
    results.append(
        compare("image_embeds", run_vision(folder, pix.numpy()), expected, min_cosine=MIN_COSINE["float16"])
    )
    table = embeddings(folder)
    ids = np.random.default_rng(5).integers(3, 300, (2, 7))
    embeds = np.asarray(table[ids])
    mask = np.ones((2, 7), np.int64)
    logits, _ = run_decoder(folder, embeds, mask, positions_of(mask, 7), empty_past(folder, 2))
    with torch.no_grad():
        out = model(
            inputs_embeds=torch.from_numpy(embeds).to("cuda"),
            attention_mask=torch.from_numpy(mask).to("cuda"),
            position_ids=torch.from_numpy(positions_of(mask, 7)).to("cuda"),
        )
    reference = out.logits[:, -1].float().cpu().numpy()
    results.append(compare("logits", logits, reference, min_cosine=MIN_COSINE["float16"], top1=True))
    assert_parity(results, "float16 ONNX (ONNX Runtime) vs float16 PyTorch on CUDA")
    assert not top1_failures("prefill", logits, reference, MARGIN["float16"])


# ---------------------------------------------------------------------------------------------
# The trained toy model: whole answers, as parity_tests/test_toy_parity.py checks on the CPU

TOY_IMAGES = 20  # about 155 held-out questions
TOY_MIN_IDENTICAL = {"float32": 1.0, "float16": 0.99}


@pytest.fixture(scope="module")
def toy_questions():
    """The held-out questions and the PyTorch float32 reference's greedy answers (on the CPU)."""
    from exporter.source import load_source
    from exporter.toy.evaluate import held_out_questions

    if not (TOY_HF_DIR / "model.safetensors").is_file():
        pytest.skip("models/toy-llava is not in this checkout")
    questions = held_out_questions(TOY_IMAGES)
    return questions, TOY_HF_DIR, load_source(str(TOY_HF_DIR))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_toy_answers_match_the_reference(toy_questions, backend, dtype, tmp_path, capsys):
    from exporter.toy.evaluate import reference_answers, runtime_answers

    questions, model_dir, source = toy_questions
    folder = export_with_cli(model_dir, tmp_path / "toy", *(["--fp16"] if dtype == "float16" else []))
    if backend == "trt":
        from exporter.engine.build import build_engines

        build_engines(
            folder, max_batch=1, timing_cache=tmp_path / "timing.cache", progress=Progress(quiet=True)
        )
    pipe = Pipeline.load(folder, backend="trt" if backend == "trt" else "ort")
    reference = reference_answers(source, pipe, questions)
    answers = runtime_answers(pipe, questions)
    identical = sum(a == r for a, r in zip(answers, reference)) / len(questions)
    with capsys.disabled():
        print(
            f"\n[{backend} {dtype} toy] {identical:.1%} of {len(questions)} answers identical to PyTorch float32"
        )
    assert identical >= TOY_MIN_IDENTICAL[dtype], [
        (q.question, a, r) for q, a, r in zip(questions, answers, reference) if a != r
    ][:5]
