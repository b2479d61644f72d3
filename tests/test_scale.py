"""exporter.testing.scale's tokenizer: the tiny one, with a piece for every other id of the
model's vocabulary, so that what a random 7B-shaped model generates decodes to text (a served
export streams it), while text tokenizes exactly as with the tiny tokenizer alone."""

from __future__ import annotations

import json

import pytest

from exporter.testing.scale import cover_vocabulary, vicuna_7b, write_tokenizer
from exporter.testing.tiny_tokenizer import DEFAULT_VOCAB_SIZE, build_tiny_tokenizer, default_corpus
from runtime.contract import TOKENIZER_FILE

VOCAB = vicuna_7b(2)["vocab_size"]  # 32064
TEXTS = [
    *default_corpus()[:5],
    "A chat between a curious human and an artificial intelligence assistant. USER: <image>\n"
    "describe the picture in detail w320 w32063 ▁w400 123 é ASSISTANT:",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tiny, scale = tmp_path_factory.mktemp("tiny"), tmp_path_factory.mktemp("scale")
    build_tiny_tokenizer(tiny)
    write_tokenizer(scale, VOCAB)
    return tiny, scale


def test_every_id_of_the_model_has_a_piece_and_text_tokenizes_as_before(folders):
    import tokenizers

    tiny, scale = (tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_FILE)) for folder in folders)
    assert tiny.get_vocab_size() == DEFAULT_VOCAB_SIZE and scale.get_vocab_size() == VOCAB
    for text in TEXTS:
        assert scale.encode(text).ids == tiny.encode(text).ids, text
        assert max(scale.encode(text).ids) < DEFAULT_VOCAB_SIZE
    assert scale.decode([DEFAULT_VOCAB_SIZE, 5000, VOCAB - 1]) == "w320 w5000 w32063"
    assert tiny.decode([5000]) == ""  # what the tiny tokenizer alone gives a random model's ids


def test_the_export_keeps_the_pieces(folders, tmp_path):
    """llava-export writes the tokenizer transformers runs: the placeholders survive it."""
    import tokenizers

    from exporter.graphs.tokenizer import save_tokenizer

    save_tokenizer(folders[1], tmp_path)
    exported = tokenizers.Tokenizer.from_file(str(tmp_path / TOKENIZER_FILE))
    tiny = tokenizers.Tokenizer.from_file(str(folders[0] / TOKENIZER_FILE))
    assert exported.get_vocab_size() == VOCAB
    assert all(exported.encode(text).ids == tiny.encode(text).ids for text in TEXTS)
    assert exported.decode([12345]) == "w12345"


def test_cover_vocabulary_refuses_a_placeholder_that_is_already_a_piece(tmp_path):
    build_tiny_tokenizer(tmp_path)
    path = tmp_path / TOKENIZER_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"]["vocab"]["▁w999"] = data["model"]["vocab"].pop("<0xFF>")
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="already a piece"):
        cover_vocabulary(path, 1000)
