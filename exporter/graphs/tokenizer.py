"""The artifact folder's tokenizer: exported from the source (tokenizer.json or a sentencepiece model).

The runtime reads `tokenizer.json` with the `tokenizers` library alone, so the file written here
must tokenize exactly as the PyTorch reference (transformers' tokenizer) does. Transformers 5
does NOT take a Llama tokenizer.json's normalizer/pre-tokenizer as written: `LlamaTokenizer`
keeps only the vocab, merges and post-processor from the file and rebuilds the rest itself
(no normalizer, Metaspace("▁", prepend_scheme="first", split=False), byte-fallback BPE).
`save_tokenizer` therefore writes the backend transformers actually runs, not the source's file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from runtime.contract import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from runtime.errors import SourceError

MODEL_MAX_LENGTH = 2048
SPM_FILE = "tokenizer.model"


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _load_sentencepiece(model_file: Path):
    """transformers' LlamaTokenizer built from a sentencepiece model (and its sibling config, if any)."""
    import sentencepiece
    from transformers import LlamaTokenizer

    if not model_file.is_file():
        raise SourceError(f"{model_file} does not exist (expected a sentencepiece tokenizer.model)")
    try:  # checked first: transformers would fall back to tiktoken and fail with a confusing message
        sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except Exception as err:
        raise SourceError(f"{model_file} is not a sentencepiece model ({_one_line(err)})") from None
    with tempfile.TemporaryDirectory(prefix="llava-spm-") as tmp:
        shutil.copyfile(model_file, Path(tmp) / SPM_FILE)
        # The sibling config carries legacy / add_bos_token / chat_template / special tokens.
        for name in (TOKENIZER_CONFIG_FILE, "special_tokens_map.json"):
            if (model_file.parent / name).is_file():
                shutil.copyfile(model_file.parent / name, Path(tmp) / name)
        config = _read_config(Path(tmp))
        config.pop("auto_map", None)
        config.pop("tokenizer_class", None)
        # Transformers 5 defaults add_bos_token to False when nothing says so; Llama adds BOS.
        config.setdefault("add_bos_token", True)
        config.setdefault("legacy", False)
        config.setdefault("model_max_length", MODEL_MAX_LENGTH)
        write_json(Path(tmp) / TOKENIZER_CONFIG_FILE, config)
        try:
            return LlamaTokenizer.from_pretrained(tmp)
        except Exception as err:  # a corrupt or non-sentencepiece file
            raise SourceError(f"cannot convert {model_file} to tokenizer.json ({_one_line(err)})") from None


def _read_config(folder: Path) -> dict:
    path = folder / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SourceError(f"{path} is not valid JSON ({_one_line(err)})") from None
    return data if isinstance(data, dict) else {}


def _chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is the chat template
        template = template.get("default")
    return template if isinstance(template, str) else None


def _processor_chat_template(folder: Path) -> str | None:
    """A processor's template (llava-hf keeps its chat template in chat_template.json, not the tokenizer's)."""
    path = folder / "chat_template.json"
    try:
        template = (
            json.loads(path.read_text(encoding="utf-8")).get("chat_template") if path.is_file() else None
        )
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) else None


def _adds(tokenizer) -> tuple[int | None, bool]:
    """(the BOS id if encoding adds it, else None; whether encoding appends EOS), by probing."""
    ids = tokenizer("a").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (bos if bos is not None and ids[:1] == [bos] else None), (eos is not None and ids[-1:] == [eos])


def _write_tokenizer(tokenizer, out: Path, chat_template: str | None) -> None:
    """Writes the backend transformers runs (tokenizer.json) and a config it reloads identically."""
    from tokenizers import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llava-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        config = _read_config(Path(tmp))
    # Transformers 5 drops these from saved configs although its Llama class rebuilds the
    # pre-tokenizer from `legacy`; the add_* flags are probed (the add_bos_token property is
    # False for a tokenizer.json whose post-processor adds BOS).
    bos, add_eos = _adds(tokenizer)
    config["add_bos_token"] = bos is not None
    config["add_eos_token"] = add_eos
    if isinstance(getattr(tokenizer, "legacy", None), bool):
        config["legacy"] = tokenizer.legacy
    # Session details transformers 5 leaks into saved configs, and remote code we do not copy.
    for key in ("is_local", "local_files_only", "name_or_path", "auto_map", "processor_class"):
        config.pop(key, None)
    named = {str(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        extra = [t for t in extra if str(t) not in named]
    if extra:  # transformers 5 lists bos/eos here when converting sentencepiece: keep only real extras
        config["extra_special_tokens"] = extra
    if chat_template is not None:
        config["chat_template"] = chat_template
    if not isinstance(config.get("model_max_length"), int) or config["model_max_length"] > 10**9:
        config.pop("model_max_length", None)  # transformers' "no limit" sentinel (1e30)
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(out / TOKENIZER_FILE), pretty=True)
    write_json(out / TOKENIZER_CONFIG_FILE, config)


def _generation_eos(folder: Path) -> list[int]:
    path = folder / "generation_config.json"
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return []
    if isinstance(eos, int):
        return [eos]
    return [e for e in eos if isinstance(e, int)] if isinstance(eos, list) else []


def save_tokenizer(src: str | os.PathLike | Any, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Writes the tokenizer of `src` (a model folder or a transformers tokenizer) into an artifact folder.

    A folder with tokenizer.json is loaded with transformers; one with only tokenizer.model is
    converted. Returns {"bos": id | None (None when BOS is not added), "eos": [ids], "pad": id,
    "chat_template": str | None}; pad falls back to eos, then unk, then 0.
    """
    from transformers import AutoTokenizer

    out = Path(out_dir)
    eos_extra: list[int] = []
    if isinstance(src, (str, os.PathLike)):
        folder = Path(src)
        if not folder.is_dir():
            raise SourceError(f"tokenizer source {folder} is not a folder")
        if (folder / TOKENIZER_FILE).is_file():
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder)
            except Exception as err:
                raise SourceError(f"cannot load the tokenizer in {folder} ({_one_line(err)})") from None
        elif (folder / SPM_FILE).is_file():
            tokenizer = _load_sentencepiece(folder / SPM_FILE)
        else:
            raise SourceError(f"{folder} has no tokenizer: expected {TOKENIZER_FILE} or {SPM_FILE}")
        eos_extra = _generation_eos(folder)
        template = _chat_template(tokenizer) or _processor_chat_template(folder)
    elif hasattr(src, "backend_tokenizer") and hasattr(src, "save_pretrained"):
        tokenizer = src
        template = _chat_template(tokenizer)
    else:
        raise SourceError(
            f"cannot read a tokenizer from {type(src).__name__} (give a model folder or a fast tokenizer)"
        )

    _write_tokenizer(tokenizer, out, template)

    bos, _ = _adds(tokenizer)
    eos: list[int] = []
    for token_id in [tokenizer.eos_token_id, *eos_extra]:
        if token_id is not None and token_id not in eos:
            eos.append(int(token_id))
    pad = next(
        (
            t
            for t in (tokenizer.pad_token_id, eos[0] if eos else None, tokenizer.unk_token_id)
            if t is not None
        ),
        0,
    )
    return {"bos": bos, "eos": eos, "pad": int(pad), "chat_template": template}
