"""The toy LoRA fine-tune (exporter/toy/lora.py): the handbook's data layout, Chinese captions
the toy tokenizer round-trips, training prompts identical to the runtime's, and LLaVA's LoRA
output folder, which PEFT itself loads onto a plain Llama.

A tiny run (a few steps on a handful of images) stands in for the shipped training
(docs/toy-model.md); the shipped adapter is checked for the same layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from exporter.toy import data, lora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "models" / "toy-llava-original"
CLIP = ROOT / "models" / "toy-clip"
SHIPPED = ROOT / "models" / "toy-llava-lora-zh"
PROJECTOR_KEYS = {f"base_model.model.model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}


def base_config() -> dict:
    return json.loads((BASE / "config.json").read_text())


def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(BASE / "tokenizer.json"))


def expected_modules(lm_head: bool) -> list[str]:
    """Module names (LLaVA's layout, PEFT's prefix) every adapter of the base must hold."""
    layers = base_config()["num_hidden_layers"]
    parts = [("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    parts += [("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")]
    names = [f"base_model.model.model.layers.{i}.{block}.{n}" for i in range(layers) for block, n in parts]
    return names + ["base_model.model.lm_head"] * lm_head


def check_output_folder(folder: Path) -> dict:
    """LLaVA's LoRA output layout; returns adapter_config.json."""
    from safetensors.torch import load_file

    assert sorted(p.name for p in folder.iterdir()) == sorted([*lora.OUTPUT_FILES, "training.json"])
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["task_type"] == "CAUSAL_LM"
    lm_head = "lm_head" in adapter_config["target_modules"]
    assert sorted(adapter_config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] + ["lm_head"] * lm_head
    )
    r = adapter_config["r"]
    tensors = load_file(folder / "adapter_model.safetensors")
    modules = expected_modules(lm_head)
    assert sorted(tensors) == sorted(f"{m}.lora_{part}.weight" for m in modules for part in "AB")
    for module in modules:
        lora_a, lora_b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        assert lora_a.shape[0] == r and lora_b.shape[1] == r, module
        assert lora_a.dtype == lora_b.dtype == lora.SAVE_DTYPE
    projector = torch.load(folder / "non_lora_trainables.bin", weights_only=True)
    assert set(projector) == PROJECTOR_KEYS
    config = json.loads((folder / "config.json").read_text())
    tower = config.pop("mm_vision_tower")
    assert (folder / tower).resolve() == CLIP.resolve()
    assert config == {k: v for k, v in base_config().items() if k != "mm_vision_tower"}
    return adapter_config


# ---------------------------------------------------------------------------------------------
# Data


def test_data_set_has_the_handbooks_layout(tmp_path):
    lora.main(["data", "--out", str(tmp_path), "--images", "3", "--seed", "5"])
    text = (tmp_path / lora.DATA_FILE).read_text(encoding="utf-8")
    assert "为该图片生成标注" in text  # ensure_ascii=False, as the handbook writes it
    records = json.loads(text)
    seeds = list(data.split_seeds("train", 8))[5:]
    assert len(records) == 3 and len({r["id"] for r in records}) == 3
    for record, seed in zip(records, seeds):
        assert set(record) == {"id", "image", "conversations"}
        scene = data.make_scene(seed)
        assert record["conversations"] == [
            {"from": "human", "value": "<image>\n为该图片生成标注。"},
            {"from": "gpt", "value": data.caption_zh(scene)},
        ]
        from PIL import Image

        image = Image.open(tmp_path / record["image"])
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(data.render(scene)))


def test_chinese_caption_example():
    shapes = [
        data.Shape("red", "circle", "large", 0),
        data.Shape("green", "triangle", "small", 2),
        data.Shape("orange", "square", "small", 4),
    ]
    assert data.caption_zh(data.Scene(0, tuple(shapes[:1]), "black")) == "红色圆形在黑色背景上"
    assert (
        data.caption_zh(data.Scene(0, (shapes[0], shapes[2]), "gray")) == "红色圆形和橙色正方形在灰色背景上"
    )
    assert data.caption_zh(data.Scene(0, tuple(shapes), "white")) == (
        "红色圆形、绿色三角形和橙色正方形在白色背景上"
    )


def test_chinese_captions_round_trip_through_the_toy_tokenizer():
    """Byte fallback: "▁" then 3 byte tokens per character, decoded back exactly, and the same
    tokens after the prompt as alone (what greedy decoding has to emit)."""
    from exporter.toy.train import check_answer_tokens

    tok = tokenizer()
    rounds = []
    for seed in data.split_seeds("train", 100):
        caption = data.caption_zh(data.make_scene(seed))
        encoding = tok.encode(caption, add_special_tokens=False)
        assert encoding.tokens[0] == "▁" and len(encoding.ids) == 1 + 3 * len(caption)
        assert all(t.startswith("<0x") for t in encoding.tokens[1:]), caption
        assert tok.decode(encoding.ids) == caption
        rounds.append((None, None, [(lora.human_text(f"<image>\n{lora.INSTRUCTION}"), caption)]))
    check_answer_tokens(tok, rounds)


def test_training_prompt_is_the_runtimes(tmp_path):
    """The ids training builds from the JSON's human turn are llava-run's for --prompt
    "为该图片生成标注。": the template rendered, chunks tokenized around <image>, 9 placeholders."""
    from exporter.source import DEFAULT_TEMPLATES, load_source
    from exporter.toy.train import conversation_sequence
    from runtime.prompts import render_prompt, tokenize_prompt

    lora.write_data(tmp_path, 2)
    images, rounds = lora.read_data(tmp_path / lora.DATA_FILE, tmp_path)
    assert images[0].size == (data.IMAGE_SIZE, data.IMAGE_SIZE)
    tok = tokenizer()
    vision = json.loads((CLIP / "config.json").read_text())
    placeholders = (vision["image_size"] // vision["patch_size"]) ** 2
    assert placeholders == 9
    chunks = tokenize_prompt(
        tok, render_prompt(DEFAULT_TEMPLATES["llama"], lora.INSTRUCTION, 1), tok.token_to_id("<s>")
    )
    runtime_ids = chunks[0] + [0] * placeholders + chunks[1]  # 0: the reference's image_token_index
    config = load_source(str(BASE)).model.config  # what training builds its sequences with
    for qa in rounds:
        ids, mask = conversation_sequence(tok, qa, config)
        assert ids[: len(runtime_ids)] == runtime_ids and not any(mask[: len(runtime_ids)])
        caption = tok.encode(qa[0][1], add_special_tokens=False).ids + [tok.token_to_id("</s>")]
        assert ids[len(runtime_ids) :] == caption and all(mask[len(runtime_ids) :])


def test_human_turn_puts_the_image_first():
    """LLaVA's preprocess_multimodal: wherever <image> stands, it moves to the front."""
    assert lora.human_text("为该图片生成标注。\n<image>") == "<image>\n为该图片生成标注。"
    with pytest.raises(ValueError):
        lora.turns([{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}])


# ---------------------------------------------------------------------------------------------
# A tiny fine-tune


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lora")
    lora.write_data(folder / "data", 6)
    out = folder / "toy-llava-lora-zh"
    accuracy = lora.main(
        ["train", "--model-base", str(BASE), "--data-path", str(folder / "data" / lora.DATA_FILE),
         "--image-folder", str(folder / "data"), "--out", str(out), "--steps", "3", "--batch-size", "3",
         "--lora-r", "4", "--lora-alpha", "8", "--eval-images", "1", "--log-every", "1"]
    )  # fmt: skip
    assert 0.0 <= accuracy <= 1.0
    return out


def test_tiny_run_writes_llavas_lora_layout(tiny_run):
    adapter_config = check_output_folder(tiny_run)
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8)
    assert Path(adapter_config["base_model_name_or_path"]).resolve() == BASE.resolve()
    assert sorted(p.name for p in tiny_run.parent.iterdir()) == ["data", tiny_run.name]  # no scratch left
    info = json.loads((tiny_run / "training.json").read_text())
    assert info["steps"] == 3 and info["heldout_images"] == 1


def test_peft_loads_the_adapter_onto_a_plain_llama(tiny_run):
    """PeftModel.from_pretrained on LlamaForCausalLM (the base's text weights): every tensor of
    the file lands in a LoRA layer, and merging changes every targeted weight by scale * B @ A."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from exporter.source import text_config_dict

    text = LlamaForCausalLM(LlamaConfig(**text_config_dict(base_config(), "llama")))
    weights = {k: v for k, v in load_file(BASE / "model.safetensors").items() if "mm_projector" not in k}
    missing, unexpected = text.load_state_dict(weights, strict=False)
    assert not missing and not unexpected
    before = {k: v.clone() for k, v in text.state_dict().items()}
    file = load_file(tiny_run / "adapter_model.safetensors")
    peft_model = PeftModel.from_pretrained(text, tiny_run)
    loaded = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    assert sorted(loaded) == sorted(file)
    assert all(torch.equal(loaded[k], file[k].to(loaded[k].dtype)) for k in file)
    adapter_config = json.loads((tiny_run / "adapter_config.json").read_text())
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    merged = peft_model.merge_and_unload().state_dict()
    targeted = set()
    for module in expected_modules(lm_head=True):
        name = module.removeprefix("base_model.model.") + ".weight"
        delta = file[f"{module}.lora_B.weight"].float() @ file[f"{module}.lora_A.weight"].float()
        assert not torch.equal(merged[name], before[name]), name
        torch.testing.assert_close(merged[name], before[name] + scale * delta)
        targeted.add(name)
    assert all(torch.equal(merged[k], before[k]) for k in before if k not in targeted)


def test_training_is_deterministic(tiny_run, tmp_path):
    """The same seed, steps and thread count write the same adapter and projector, byte for byte."""
    data_folder = tiny_run.parent / "data"
    again = tmp_path / "again"
    lora.main(
        ["train", "--model-base", str(BASE), "--data-path", str(data_folder / lora.DATA_FILE),
         "--image-folder", str(data_folder), "--out", str(again), "--steps", "3", "--batch-size", "3",
         "--lora-r", "4", "--lora-alpha", "8", "--eval-images", "0"]
    )  # fmt: skip
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (again / name).read_bytes() == (tiny_run / name).read_bytes(), name
    first = torch.load(tiny_run / "non_lora_trainables.bin", weights_only=True)
    second = torch.load(again / "non_lora_trainables.bin", weights_only=True)
    assert all(torch.equal(first[k], second[k]) for k in PROJECTOR_KEYS)


def test_a_failed_run_leaves_out_as_it_was(tiny_run, tmp_path, monkeypatch):
    """OUT is written beside itself and renamed at the end: a run that fails after writing
    leaves no scratch folder and the previous OUT untouched."""
    import shutil

    out = tmp_path / "toy-llava-lora-zh"
    shutil.copytree(tiny_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(lora, "held_out_captions", fail)
    data_folder = tiny_run.parent / "data"
    with pytest.raises(RuntimeError, match="evaluation failed"):
        lora.main(
            ["train", "--model-base", str(BASE), "--data-path", str(data_folder / lora.DATA_FILE),
             "--image-folder", str(data_folder), "--out", str(out), "--steps", "1", "--batch-size", "2",
             "--eval-images", "1"]
        )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------------------------------------
# The shipped adapter


def test_shipped_adapter_has_the_layout():
    if not (SHIPPED / "adapter_model.safetensors").is_file():
        pytest.skip("models/toy-llava-lora-zh is not in this checkout")
    adapter_config = check_output_folder(SHIPPED)
    info = json.loads((SHIPPED / "training.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (info["lora_r"], info["lora_alpha"])
    assert adapter_config["base_model_name_or_path"] == "models/toy-llava-original"
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 500_000
