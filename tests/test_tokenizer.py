"""The tiny trained tokenizer (exporter/testing/tiny_tokenizer.py), and sentencepiece conversion
and export to an artifact folder (exporter/graphs/tokenizer.py)."""

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from tokenizers import Tokenizer  # noqa: E402

from exporter.graphs.tokenizer import (  # noqa: E402
    _chat_template,
    _load_sentencepiece,
    _write_tokenizer,
    save_tokenizer,
)
from exporter.testing.tiny_tokenizer import MIN_VOCAB, build_tiny_tokenizer  # noqa: E402
from runtime.errors import SourceError  # noqa: E402

TEXTS = [
    "What colour is the ball?",
    "USER: How many cats are there? ASSISTANT:",
    "\nDescribe the image in detail.",
    "ünïcødé 猫 and digits 12345",
    "tab\tand new\nline",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_tok")
    build_tiny_tokenizer(folder)
    return folder


def test_tiny_is_deterministic(tiny, tmp_path):
    build_tiny_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny / name).read_bytes()


def test_tiny_layout(tiny):
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert tok.get_vocab_size() == 320
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<0x00>", "<0xFF>")] == [0, 1, 2, 3, 258]
    added = json.loads((tiny / "tokenizer.json").read_text())["added_tokens"]
    assert [t["content"] for t in added] == ["<unk>", "<s>", "</s>"]  # bytes are vocab, not added tokens
    for text in TEXTS:  # byte fallback: everything encodes, nothing is <unk>, decoding round-trips
        ids = tok.encode(text, add_special_tokens=False).ids
        assert 0 not in ids and tok.decode(ids) == text


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB, 300, 512])
def test_tiny_vocab_size(tmp_path, vocab_size):
    build_tiny_tokenizer(tmp_path, vocab_size=vocab_size)
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size() == vocab_size


def test_tiny_vocab_size_errors(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        build_tiny_tokenizer(tmp_path, vocab_size=MIN_VOCAB - 1)
    with pytest.raises(ValueError, match="larger corpus"):
        build_tiny_tokenizer(tmp_path, vocab_size=400, corpus=["a b"])


def test_tiny_custom_corpus(tmp_path):
    build_tiny_tokenizer(tmp_path, vocab_size=270, corpus=["zebra zebra zebra"])  # 6 chars + 5 merges
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.encode("zebra", add_special_tokens=False).tokens == ["▁zebra"]


def test_tiny_loads_in_transformers(tiny):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny)
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    assert len(hf) == 320
    for text in TEXTS + ["", " leading space", "a</s>b"]:
        ids = hf(text).input_ids
        assert ids[0] == 1  # add_bos_token
        assert ids == tok.encode(text).ids  # the runtime's tokenizers reads the same file identically
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def _train_spm(folder):
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    corpus.write_text(
        "\n".join(
            [
                "What colour is the big red ball in the image?",
                "USER: How many cats are there? ASSISTANT: There are three cats.",
                "The square is blue and the circle is green.",
                "Describe the picture in detail, please.",
            ]
            * 10
        )
    )
    # Llama's settings: BPE, byte fallback, identity normalization, whitespace kept, digits split.
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return folder / "tokenizer.model"


def convert_sentencepiece(model_file: Path, out: Path) -> None:
    """A sentencepiece tokenizer.model to tokenizer.json (+ config), as save_tokenizer converts
    an original checkpoint's, from any file name."""
    tokenizer = _load_sentencepiece(model_file)
    _write_tokenizer(tokenizer, out, chat_template=_chat_template(tokenizer))


def test_convert_sentencepiece(tmp_path):
    import sentencepiece as spm

    model = _train_spm(tmp_path)
    out = tmp_path / "out"
    convert_sentencepiece(model, out)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    # (A leading space is the one known difference: Metaspace does not add a second "▁".)
    for text in TEXTS + ["a cat  with two  spaces"]:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text
        assert tok.encode(text).ids[0] == sp.bos_id()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["eos_token"] == "</s>"


def test_convert_sentencepiece_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        convert_sentencepiece(tmp_path / "missing.model", tmp_path / "out")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(SourceError, match="not a sentencepiece model") as info:
        convert_sentencepiece(bad, tmp_path / "out")
    assert "\n" not in str(info.value)


def test_save_tokenizer_from_folder(tiny, tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    src = tmp_path / "src"
    build_tiny_tokenizer(src, chat_template=template)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    info = save_tokenizer(src, tmp_path / "art")
    assert info == {"bos": 1, "eos": [2, 7], "pad": 2, "chat_template": template}
    assert (tmp_path / "art" / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text().replace(
        '"unk_token": "<unk>"', '"unk_token": null'
    )  # transformers' LlamaTokenizer builds its BPE without an unk token (byte fallback covers all)
    config = json.loads((tmp_path / "art" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == template and config["add_bos_token"] is True


def test_save_tokenizer_takes_a_processor_chat_template(tmp_path):
    src = tmp_path / "hf"
    build_tiny_tokenizer(src)
    (src / "chat_template.json").write_text(
        json.dumps({"chat_template": "USER: {{ messages[0]['content'] }}"})
    )
    assert save_tokenizer(src, tmp_path / "art")["chat_template"] == "USER: {{ messages[0]['content'] }}"


def test_save_tokenizer_reloads_identically(tiny, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tiny, tmp_path)
    before, after = AutoTokenizer.from_pretrained(tiny), AutoTokenizer.from_pretrained(tmp_path)
    runtime = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in TEXTS:
        assert before(text).input_ids == after(text).input_ids == runtime.encode(text).ids


def test_save_tokenizer_from_object_and_sentencepiece(tmp_path):
    from transformers import AutoTokenizer

    src = tmp_path / "original"
    src.mkdir()
    _train_spm(src)
    (src / "config.json").write_text(json.dumps({"model_type": "llava_llama"}))
    info = save_tokenizer(src, tmp_path / "art")  # no tokenizer.json: tokenizer.model is converted
    assert info == {"bos": 1, "eos": [2], "pad": 2, "chat_template": None}
    hf = AutoTokenizer.from_pretrained(tmp_path / "art")
    info = save_tokenizer(hf, tmp_path / "art2")
    assert info["bos"] == 1 and info["eos"] == [2]


def test_save_tokenizer_without_bos_or_eos(tiny, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny)
    hf.add_bos_token = False
    hf.eos_token = None
    info = save_tokenizer(hf, tmp_path)
    assert info["bos"] is None and info["eos"] == [] and info["pad"] == 0  # pad falls back to unk
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("a").ids[:1] != [1]


def test_save_tokenizer_errors(tmp_path):
    with pytest.raises(SourceError, match="not a folder"):
        save_tokenizer(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(SourceError, match="has no tokenizer"):
        save_tokenizer(tmp_path, tmp_path / "out")
    with pytest.raises(SourceError, match="cannot read a tokenizer"):
        save_tokenizer(42, tmp_path / "out")
