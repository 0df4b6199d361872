"""ERNIE-4.5-VL special token ids: from ``config.json``, else from the tokenizer and processor files.

transformers' nested config names every id (``image_token_id``, ``image_start_token_id``, ...). The
released remote-code (flat) config names only the image placeholder, as ``im_patch_id``; the other ids
live in the tokenizer files, under the token strings ERNIE's processor uses (``<|IMAGE_START|>`` ...,
the strings transformers' ``convert_ernie4_5_vl_moe_to_hf.py`` registers as ``image_start_token`` ...).

Only plain JSON is read (never the remote-code tokenizer class): ``tokenizer_config.json``
(``added_tokens_decoder``, and the token strings it may name), ``tokenizer.json`` (``added_tokens``),
``added_tokens.json``, and ``processor_config.json`` / ``preprocessor_config.json`` for token strings.
"""

from __future__ import annotations

import json
from pathlib import Path

from ckptconv.errors import ConversionError

#: config field -> (the key naming its token string in tokenizer/processor configs, ERNIE's string)
TOKEN_FIELDS: dict[str, tuple[str, str]] = {
    "image_token_id": ("image_token", "<|IMAGE_PLACEHOLDER|>"),
    "image_start_token_id": ("image_start_token", "<|IMAGE_START|>"),
    "image_end_token_id": ("image_end_token", "<|IMAGE_END|>"),
    "video_token_id": ("video_token", "<|VIDEO_PLACEHOLDER|>"),
    "video_start_token_id": ("video_start_token", "<|VIDEO_START|>"),
    "video_end_token_id": ("video_end_token", "<|VIDEO_END|>"),
}
_STRING_FILES = ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: not readable JSON: {exc}") from None


def _content(token) -> str | None:
    """Added tokens are written as strings or as ``{"content": ...}`` (AddedToken) dicts."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def vocabulary_of_added_tokens(model_dir: Path) -> dict[str, int]:
    """``{token string: id}`` of every added/special token the tokenizer files declare."""
    ids: dict[str, int] = {}
    path = model_dir / "tokenizer.json"
    if path.is_file():
        for entry in _read_json(path).get("added_tokens") or []:
            if isinstance(entry, dict) and isinstance(entry.get("content"), str) and isinstance(entry.get("id"), int):
                ids[entry["content"]] = entry["id"]
    path = model_dir / "added_tokens.json"
    if path.is_file():
        ids.update({k: int(v) for k, v in _read_json(path).items() if isinstance(v, int)})
    path = model_dir / "tokenizer_config.json"
    if path.is_file():
        for key, entry in (_read_json(path).get("added_tokens_decoder") or {}).items():
            content = _content(entry)
            if content is not None and str(key).isdigit():
                ids[content] = int(key)
    return ids


def token_strings(model_dir: Path) -> dict[str, str]:
    """``{config field: token string}``: ERNIE's strings, unless a tokenizer/processor config names others."""
    strings = {field: default for field, (_key, default) in TOKEN_FIELDS.items()}
    for name in _STRING_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        data = _read_json(path)
        for field, (key, _default) in TOKEN_FIELDS.items():
            value = _content(data.get(key)) if isinstance(data, dict) else None
            if value:
                strings[field] = value
    return strings


def complete_token_ids(config: dict, model_dir: Path) -> dict:
    """``config`` with every special token id it lacks (top level, nested ``text_config`` or, for the
    image placeholder, ``im_patch_id``) filled from the tokenizer files. A new dict; ids the config
    has always win."""
    model_dir = Path(model_dir)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    missing = [
        field for field in TOKEN_FIELDS
        if config.get(field) is None and text.get(field) is None and not (field == "image_token_id" and config.get("im_patch_id") is not None)
    ]
    if not missing:
        return config
    added = vocabulary_of_added_tokens(model_dir)
    strings = token_strings(model_dir)
    completed = dict(config)
    for field in missing:
        token_id = added.get(strings[field])
        if token_id is not None:
            completed[field] = token_id
    return completed
