"""Training outputs on `--model-base` (exporter/adapters.py), against PEFT's own merge.

Each kind of training output the loader takes has a case in CASES, written by PEFT on the
tiny model (tests/support/adapters.py). Every case is loaded, compared weight by weight with
PEFT's merge_and_unload, exported, and its graphs run against that PEFT reference; the
errors a user meets name what to fix.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from exporter import adapters  # noqa: E402
from exporter.graphs.decoder import export_decoder  # noqa: E402
from exporter.graphs.vision import export_vision  # noqa: E402
from exporter.progress import Progress  # noqa: E402
from exporter.source import load_source  # noqa: E402
from exporter.testing.tiny import TinyConfig  # noqa: E402
from exporter.verify import verify_artifacts  # noqa: E402
from runtime import contract  # noqa: E402
from runtime.errors import SourceError  # noqa: E402
from tests.support import adapters as made  # noqa: E402
from tests.support.cli import assert_user_error, invoke  # noqa: E402

VISION_LINEAR = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One training output: how it is written, what it is merged onto, which graphs it changes."""

    kind: str  # exporter.adapters.TRAINING_OUTPUTS
    base: str  # the tiny folder it goes on: "original", "text" (the language model) or "hf"
    layout: str  # the adapter's key layout (exporter.adapters.adapter_layout), or "projector"
    adapter_file: str | None  # exporter.adapters.ADAPTER_FILES, None for a projector
    graphs: tuple[str, ...]
    options: tuple = ()  # (name, value) pairs for the writer


CASES = {
    "original-safetensors": Case(
        "lora", "original", "llava-original", "adapter_model.safetensors", ("vision", "decoder")
    ),
    "original-bin": Case("lora", "original", "llava-original", "adapter_model.bin", ("decoder",)),
    "original-rslora": Case(
        "lora",
        "original",
        "llava-original",
        "adapter_model.safetensors",
        ("decoder",),
        (("use_rslora", True), ("r", 8), ("alpha", 6)),
    ),
    "projector-only": Case("projector", "text", "projector", None, ("vision", "decoder")),
    "hf-new-layout": Case("lora", "hf", "peft-hf-llava", "adapter_model.safetensors", ("decoder",)),
    "hf-old-layout": Case(
        "lora", "hf", "peft-hf-llava", "adapter_model.safetensors", ("decoder",), (("layout", "old"),)
    ),
    "hf-all-linear": Case(
        "lora",
        "hf",
        "peft-hf-llava",
        "adapter_model.safetensors",
        ("vision", "decoder"),
        (("target", "all-linear"),),
    ),
}


class Made:
    """Every case's folders and PEFT references, written once per module."""

    def __init__(self, workshop, factory):
        self.workshop, self.factory = workshop, factory
        self.folders = workshop.tiny()
        self.llava = workshop.reference()
        self.cache: dict[str, tuple] = {}

    def base(self, which: str):
        if which == "text":
            if "text" not in self.cache:
                self.cache["text"] = made.write_language_model(
                    self.llava, self.folders, self.factory.mktemp("vicuna")
                )
            return self.cache["text"]
        return self.folders[which]

    def case(self, name: str):
        """(training output folder, base folder, PEFT's merged LlavaForConditionalGeneration)."""
        if name not in self.cache:
            self.cache[name] = self.write(CASES[name], self.factory.mktemp(name))
        return self.cache[name]

    def write(self, case: Case, out):
        options = dict(case.options)
        base = self.base(case.base)
        if case.kind == "projector":
            out = out / "projector"
            projector = made.write_projector_only(self.folders, self.llava, out)
            return out, base, with_projector(self.llava, projector)
        if case.base == "original":
            weights = "bin" if case.adapter_file == "adapter_model.bin" else "safetensors"
            made.write_original_lora(self.folders, self.llava, out, weights=weights, **options)
            return out, base, made.original_lora_reference(self.llava, out)
        target = options.pop("target", made.LLAVA_DECODER_LINEAR)
        made.write_hf_lora(base, out, target, **options)
        return out, base, made.hf_lora_reference(base, out)


def with_projector(llava, projector):
    """The base with a projector-only checkpoint's projector: what LLaVA's loader builds."""
    reference = copy.deepcopy(llava)
    made.load_projector(reference, projector)
    return reference


@pytest.fixture(scope="module")
def cases(workshop, tmp_path_factory) -> Made:
    return Made(workshop, tmp_path_factory)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith(("inv_freq", "position_ids"))}


def test_every_kind_of_training_output_has_a_case():
    kinds = {case.kind for case in CASES.values()}
    layouts = {case.layout for case in CASES.values()}
    files = {case.adapter_file for case in CASES.values()} - {None}
    assert kinds == set(adapters.TRAINING_OUTPUTS)
    assert layouts == {adapters.adapter_layout("original"), adapters.adapter_layout("hf"), "projector"}
    assert files == set(adapters.ADAPTER_FILES)
    options = {name for case in CASES.values() for name, _ in case.options}
    assert {"use_rslora", "layout", "target"} <= options


@pytest.mark.parametrize("name", CASES)
def test_merged_weights_equal_peft_merge_and_unload(cases, name):
    folder, base, reference = cases.case(name)
    source = load_source(str(folder), model_base=str(base))
    ours, peft = state(source.model), state(reference)
    assert sorted(ours) == sorted(peft)
    far = [k for k in ours if not torch.allclose(ours[k], peft[k], rtol=1e-5, atol=1e-6)]
    assert not far, f"tensors differ from PEFT's merge: {far[:5]}"
    base_state = state(cases.llava)
    changed = [k for k in ours if not torch.equal(ours[k], base_state[k])]
    assert changed, "the merge changed nothing"
    if CASES[name].kind == "lora" and "target" not in dict(CASES[name].options):
        # every linear layer of the decoder moved, and nothing else in it
        decoder = cases.llava.model.language_model
        linear = {n for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)}
        assert {k for k in changed if k.startswith("model.language_model.")} == {
            f"model.language_model.{n}.weight" for n in linear
        }


@pytest.mark.parametrize("name", CASES)
def test_exported_graphs_match_peft_reference(cases, name, tmp_path):
    folder, base, reference = cases.case(name)
    source = load_source(str(folder), model_base=str(base))
    for graph in CASES[name].graphs:
        export = export_vision if graph == "vision" else export_decoder
        export(source, tmp_path, progress=Progress(quiet=True))
    results = verify_artifacts(dataclasses.replace(source, model=reference), tmp_path, Progress(quiet=True))
    assert results and all(r.ok for r in results)  # verify_artifacts raises on any failure
    assert set(contract.read_manifest(tmp_path).graphs) == set(CASES[name].graphs)


def test_fp16_merge_stays_in_fp16_and_rounds_once(cases):
    folder, base, reference = cases.case("original-safetensors")
    source = load_source(str(folder), model_base=str(base), dtype=torch.float16)
    assert {p.dtype for p in source.model.parameters()} == {torch.float16}
    weight = source.model.model.language_model.layers[0].self_attn.q_proj.weight
    expected = reference.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(weight.float(), expected, rtol=1e-3, atol=1e-3)


def test_hf_names_in_every_layout():
    new = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert adapters.hf_name("language_model.model.layers.0.self_attn.q_proj.weight") == new
    assert adapters.hf_name(new) == new
    assert adapters.hf_name("language_model.lm_head.weight") == "lm_head.weight"
    tower = "model.vision_tower.encoder.layers.1.mlp.fc1.weight"
    for key in (
        "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",  # transformers < 4.52
        "model.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",  # 4.52 - 4.57
        tower,  # 5.x
    ):
        assert adapters.hf_name(key) == tower
    assert (
        adapters.hf_name("multi_modal_projector.linear_1.weight")
        == "model.multi_modal_projector.linear_1.weight"
    )


def test_pattern_overrides_r_and_alpha_per_module(tmp_path):
    adapter = adapters.LoraAdapter(
        tmp_path,
        tmp_path / "a",
        {
            "r": 4,
            "lora_alpha": 8,
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"layers.1.mlp.up_proj": 1},
        },
    )
    assert adapter.scale("model.layers.0.self_attn.q_proj") == 8 / 2
    assert adapter.scale("model.layers.1.mlp.up_proj") == 1 / 4
    assert adapter.scale("model.layers.0.mlp.up_proj") == 8 / 4
    rslora = dataclasses.replace(adapter, config={"r": 16, "lora_alpha": 8, "use_rslora": True})
    assert rslora.scale("anything") == 8 / 4


# ---------------------------------------------------------------------------------------------
# The manifest and the CLI


def test_export_cli_records_base_adapter_and_each_sha256(cases, tmp_path):
    folder, base, reference = cases.case("original-safetensors")
    out = tmp_path / "out"
    result = invoke("all", "--model", folder, "--model-base", base, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    source = contract.read_manifest(out).source
    assert source["path"] == str(folder) and source["format"] == "original"
    assert source["base"]["path"] == str(base) and source["base"]["format"] == "original"
    assert (source["adapter"]["r"], source["adapter"]["alpha"], source["adapter"]["rslora"]) == (
        4,
        8.0,
        False,
    )
    assert source["adapter"]["sha256"] == contract.file_sha256(
        folder / "adapter_config.json",
        folder / "adapter_model.safetensors",
        folder / "non_lora_trainables.bin",
    )
    assert source["base"]["sha256"] == contract.file_sha256(base / "model.safetensors")
    assert source["vision_tower"]["sha256"] == contract.file_sha256(
        cases.folders["clip"] / "model.safetensors"
    )
    assert len({source["weights_sha256"], source["base"]["sha256"], source["adapter"]["sha256"]}) == 3

    verified = invoke("verify", "--model", folder, "--model-base", base, "--artifacts", out)
    assert verified.exit_code == 0, verified.output
    # the export itself is the merged model: PEFT's reference passes too
    source = load_source(str(folder), model_base=str(base))
    verify_artifacts(dataclasses.replace(source, model=reference), out, Progress(quiet=True))


def test_another_adapter_is_another_model(cases, tmp_path):
    folder, base, _ = cases.case("original-safetensors")
    out = tmp_path / "out"
    assert invoke("decoder", "--model", folder, "--model-base", base, "--out", out, "--quiet").exit_code == 0
    other, _, _ = cases.case("original-rslora")
    result = invoke("decoder", "--model", other, "--model-base", base, "--out", out, "--quiet")
    assert_user_error(result, "another model", "--force")


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming what to fix, nothing written


def test_lora_folder_without_model_base_names_the_flag(cases, tmp_path):
    folder, _, _ = cases.case("original-safetensors")
    out = tmp_path / "out"
    assert_user_error(
        invoke("all", "--model", folder, "--out", out, "--quiet"), "LoRA adapter folder", "--model-base"
    )
    assert not out.exists()
    projector, _, _ = cases.case("projector-only")
    assert_user_error(
        invoke("vision", "--model", projector, "--out", out, "--quiet"), "projector-only", "--model-base"
    )


def test_model_base_on_a_whole_model(cases, tmp_path):
    folders = cases.folders
    result = invoke(
        "all", "--model", folders["hf"], "--model-base", folders["hf"], "--out", tmp_path / "o", "--quiet"
    )
    assert_user_error(result, "whole model", "drop --model-base")


def test_detected_by_files_not_by_name(cases, tmp_path):
    """LLaVA's loader goes by "lora" in the folder's name; a renamed LoRA folder still merges,
    and a whole model named like one loads as a model."""
    folder, base, reference = cases.case("original-safetensors")
    renamed = shutil.copytree(folder, tmp_path / "checkpoint-1000")
    merged = load_source(str(renamed), model_base=str(base)).model
    assert torch.equal(state(merged)["lm_head.weight"], state(reference)["lm_head.weight"])
    model = shutil.copytree(cases.folders["hf"], tmp_path / "llava-lora-merged")
    assert load_source(str(model)).format == "hf"


def test_base_with_other_shapes_names_the_first_mismatching_tensor(cases, tmp_path):
    folder, _, _ = cases.case("original-safetensors")
    other = cases.workshop.tiny(TinyConfig(text_hidden=48))["original"]
    with pytest.raises(SourceError, match=r"weight lm_head\.weight has shape \(320, 48\)") as err:
        load_source(str(folder), model_base=str(other))
    assert str(folder / "config.json") in str(err.value)


def test_hf_adapter_on_another_base_names_the_module(cases):
    folder, _, _ = cases.case("hf-new-layout")
    other = cases.workshop.tiny(TinyConfig(text_layers=3, kv_heads=4))["hf"]
    with pytest.raises(
        SourceError, match=r"adapter module model\.language_model\.layers\.0\.self_attn\.k_proj"
    ):
        load_source(str(folder), model_base=str(other))


def test_adapter_matching_no_module_is_an_error_with_the_count(cases, tmp_path):
    folder, base, _ = cases.case("hf-new-layout")
    moved = shutil.copytree(folder, tmp_path / "moved")
    rewrite_keys(moved, lambda k: k.replace("layers.1.", "decoder.layers.1."))
    with pytest.raises(SourceError, match=r"7 of 14 adapted modules match no module .*7 matched"):
        load_source(str(moved), model_base=str(base))
    # an original-layout adapter on a Hugging Face base: nothing matches
    original, _, _ = cases.case("original-safetensors")
    with pytest.raises(SourceError, match=r"14 of 14 adapted modules .*; 0 matched"):
        load_source(str(original), model_base=str(cases.folders["hf"]))


def rewrite_keys(folder, rename) -> None:
    from safetensors.torch import load_file, save_file

    file = str(folder / "adapter_model.safetensors")
    save_file({rename(k): v for k, v in load_file(file).items()}, file, metadata={"format": "pt"})


def edit_adapter_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"peft_type": "LOHA"}, "adapter type LOHA is not supported"),
        ({"peft_type": "IA3"}, "adapter type IA3 is not supported"),
        ({"use_dora": True}, "DoRA"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ],
)
def test_unsupported_peft_types_are_named(cases, tmp_path, changes, named):
    folder, base, _ = cases.case("original-bin")
    edited = shutil.copytree(folder, tmp_path / "edited")
    edit_adapter_config(edited, **changes)
    result = invoke("decoder", "--model", edited, "--model-base", base, "--out", tmp_path / "out", "--quiet")
    assert_user_error(result, named)
    assert not (tmp_path / "out").exists()


def test_zero3_checkpoint_says_how_to_save_it(cases, tmp_path):
    folder, base, _ = cases.case("original-bin")
    empty = shutil.copytree(folder, tmp_path / "zero3")
    trained = torch.load(empty / "non_lora_trainables.bin", weights_only=True)
    torch.save({k: torch.empty(0) for k in trained}, empty / "non_lora_trainables.bin")
    with pytest.raises(SourceError, match="ZeRO-3.*ZeRO-2.*zero_to_fp32.py"):
        load_source(str(empty), model_base=str(base))
    adapter = torch.load(empty / "adapter_model.bin", weights_only=True)
    torch.save({k: torch.empty(0) for k in adapter}, empty / "adapter_model.bin")
    with pytest.raises(SourceError, match="adapter was saved under DeepSpeed ZeRO-3"):
        load_source(str(empty), model_base=str(base))


class Payload:
    """Not a tensor: torch.load(weights_only=True) must refuse to rebuild it."""


def test_bin_files_are_read_without_unpickling_code(cases, tmp_path):
    folder, base, _ = cases.case("original-bin")
    hostile = shutil.copytree(folder, tmp_path / "hostile")
    torch.save(
        {"base_model.model.model.mm_projector.0.weight": Payload()}, hostile / "non_lora_trainables.bin"
    )
    with pytest.raises(SourceError, match="non_lora_trainables.bin cannot be read as a weights file"):
        load_source(str(hostile), model_base=str(base))


def test_adapter_weights_without_their_config(cases, tmp_path):
    folder, base, _ = cases.case("hf-new-layout")
    stray = shutil.copytree(folder, tmp_path / "stray")
    (stray / "adapter_config.json").unlink()
    with pytest.raises(SourceError, match="adapter_model.safetensors but no adapter_config.json"):
        load_source(str(stray), model_base=str(base))


def test_projector_only_needs_the_language_model_as_base(cases, tmp_path):
    folder, _, _ = cases.case("projector-only")
    with pytest.raises(SourceError, match="not the Hugging Face LLaVA"):
        load_source(str(folder), model_base=str(cases.folders["hf"]))
    missing = tmp_path / "nothing-here"
    result = invoke("all", "--model", folder, "--model-base", missing, "--out", tmp_path / "out", "--quiet")
    assert_user_error(result, "base model", "--model-base")
    assert not (tmp_path / "out").exists()
