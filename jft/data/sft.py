"""Supervised fine-tuning data: a JSONL file of prompts and completions, or of chats.

``config.data.name = "sft"`` reads ``config.data.path``, one JSON object a line::

    {"prompt": "Translate: chat", "completion": " cat"}
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    {"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}]}

A prompt/completion pair of strings is the prompt (with the tokenizer's special
tokens, e.g. BOS), the completion and EOS; messages are rendered with the chat
template of ``config.data.tokenizer`` (:mod:`jft.data.chat`). Only the completion,
or the assistant messages (of the completion, in the third form), count in the
loss: every row carries

- ``input_ids`` ``(max_length,)`` int32, padded with the tokenizer's pad id;
- ``attention_mask``: 0 on padding, else the example's segment id within the row
  (always 1 without packing); the decoders let a token see only its own segment
  and restart position ids at each segment (:mod:`jft.models._decoder`);
- ``loss_mask``: 1 on the tokens to learn, for ``causal_lm_xent``. A segment's
  first token is never learned, so no document is predicted from another.

With ``config.data.packing`` the examples, in file order, fill rows of
``max_length`` tokens (next fit: an example that does not fit the current row
starts the next one); no example is cut. The splits are slices of the file in
tfds syntax (``train``, ``train[:90%]``, ``train[90%:]``, ``train[:100]``),
taken before packing, and batches go through the grain pipeline of
:mod:`jft.data.pipeline` like any data set (shuffled rows, exact resume).
"""

from __future__ import annotations

import collections
import json
import os
import threading
import types
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jft.data import chat
from jft.data.errors import DataError
from jft.data.token_rows import Source, TokenRows

__all__ = ["NAME", "SftSplit", "check_config", "encode", "open_split", "pack", "read_jsonl"]

NAME = "sft"
SPLIT = "train"  # the file's one split; others are slices of it
_CACHE: collections.OrderedDict[tuple, SftSplit] = collections.OrderedDict()
_CACHE_SLOTS = 4
_LOCK = threading.Lock()
_FORMS = (
    '{"prompt": str, "completion": str}, {"messages": [{"role", "content"}, ...]} or '
    '{"prompt": [messages], "completion": [messages]}'
)


def check_config(cfg: Mapping[str, Any]) -> None:
    """Checks the ``config.data`` keys of an SFT data set (resolved), before reading anything.

    Raises:
      DataError: a missing path or tokenizer, a bad ``max_length``, or a key that SFT
        data do not take.
    """
    if not cfg.get("path"):
        raise DataError("config.data.name='sft' needs config.data.path: a JSONL file")
    if not os.path.isfile(cfg["path"]):
        raise DataError(f"config.data.path={cfg['path']!r}: no such file (a JSONL file)")
    if not cfg.get("tokenizer"):
        raise DataError(
            "config.data.name='sft' needs config.data.tokenizer: the model folder "
            "(or its tokenizer.json)"
        )
    length = cfg.get("max_length")
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise DataError(f"config.data.max_length must be an integer >= 2, got {length!r}")
    if cfg.get("preprocess"):
        raise DataError("config.data.preprocess does not apply to SFT data; set it to ''")
    if cfg.get("keep_classes") is not None:
        raise DataError("config.data.keep_classes does not apply to SFT data; set it to None")


def read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each non-blank line of ``path``, each record checked.

    Raises:
      DataError: a line that is not JSON, not an object, or without the keys (its number).
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg}); expected {_FORMS}") from None
            _check_record(record, where)
            out.append((number, record))
    if not out:
        raise DataError(f"{path}: no examples (expected JSON lines {_FORMS})")
    return out


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )


def _check_record(record: Any, where: str) -> None:
    if isinstance(record, dict):
        if "messages" in record and _is_messages(record["messages"]) and record["messages"]:
            return
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return
        if _is_messages(prompt) and _is_messages(completion) and completion:
            return
        got = f"an object with keys {sorted(record)}"
    else:
        got = type(record).__name__
    raise DataError(f"{where}: expected {_FORMS}; got {got}")


def encode(
    record: Mapping[str, Any], tokenizer: chat.ChatTokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, learn)`` int32 of one checked record; ``learn`` is 1 on the tokens to learn."""
    if "messages" in record:
        return tokenizer.encode_chat(record["messages"])
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str):
        return tokenizer.encode_completion(prompt, completion)
    return tokenizer.encode_chat([*prompt, *completion], learn_from=len(prompt))


def pack(lengths: np.ndarray, max_length: int) -> list[list[int]]:
    """Rows of example indices, in order, each row's lengths summing to ``max_length`` or less.

    >>> pack(np.array([3, 4, 2, 5]), 8)
    [[0, 1], [2, 3]]
    """
    rows: list[list[int]] = []
    used = max_length
    for i, n in enumerate(lengths):
        if used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += int(n)
    return rows


def _rows(examples, groups, max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    shape = (len(groups), max_length)
    ids = np.full(shape, pad_id, np.int32)
    segments = np.zeros(shape, np.int32)
    learn = np.zeros(shape, np.int32)
    for r, group in enumerate(groups):
        at = 0
        for s, i in enumerate(group, 1):
            x, y = examples[i]
            ids[r, at : at + len(x)] = x
            segments[r, at : at + len(x)] = s
            learn[r, at + 1 : at + len(x)] = y[1:]
            at += len(x)
    return {"input_ids": ids, "attention_mask": segments, "loss_mask": learn}


def _slice(split: str, n: int, path: str) -> np.ndarray:
    try:
        instruction = tfds.core.ReadInstruction.from_spec(split)
        parts = instruction.to_absolute({SPLIT: types.SimpleNamespace(num_examples=n)})
    except (ValueError, AssertionError) as e:
        raise DataError(
            f"split {split!r} of {path}: {str(e).splitlines()[0]} (a JSONL file has one "
            f"split, '{SPLIT}'; slice it, e.g. train_split='train[:90%]', "
            "eval_split='train[90%:]')"
        ) from None
    return np.concatenate([np.arange(n)[p.from_ : p.to] for p in parts])


SftSplit = TokenRows
"""One split of an SFT file, tokenized, masked and packed into rows (an alias of
:class:`jft.data.token_rows.TokenRows`; no preprocessing ops apply: :func:`check_config`)."""


def _build(cfg: Mapping[str, Any], split: str) -> SftSplit:
    path, max_length = cfg["path"], int(cfg["max_length"])
    records = read_jsonl(path)
    tokenizer = chat.load(cfg["tokenizer"], cfg.get("chat_template"))
    keep = _slice(split, len(records), path)
    if len(keep) == 0:
        raise DataError(
            f"split {split!r} of {path} ({len(records)} examples) holds none: slice it "
            "otherwise (config.data.train_split / eval_split, e.g. 'train[-10:]')"
        )
    examples = []
    for i in keep:
        number, record = records[i]
        try:
            ids, learn = encode(record, tokenizer)
        except DataError as e:
            raise DataError(f"{path} line {number}: {e}") from None
        if len(ids) > max_length:
            raise DataError(
                f"{path} line {number}: the example takes {len(ids)} tokens, more than "
                f"config.data.max_length={max_length}; set config.data.max_length={len(ids)} "
                "or more, or shorten that line"
            )
        if not learn[1:].any():
            raise DataError(
                f"{path} line {number}: nothing to learn (an empty completion or no "
                "assistant message); give it a completion"
            )
        examples.append((ids, learn))
    lengths = np.asarray([len(x) for x, _ in examples])
    groups = pack(lengths, max_length) if cfg.get("packing") else [[i] for i in range(len(keep))]
    columns = _rows(examples, groups, max_length, tokenizer.pad_id)
    return SftSplit(Source(os.path.basename(path)), columns, len(keep))


def open_split(cfg: Mapping[str, Any], split: str) -> SftSplit:
    """The split ``split`` of ``config.data`` (resolved), built once per file version.

    Raises:
      DataError: one line naming the file, the line and what to change.
    """
    check_config(cfg)
    stat = os.stat(cfg["path"])
    key = (
        os.path.abspath(cfg["path"]),
        stat.st_mtime_ns,
        stat.st_size,
        os.path.abspath(cfg["tokenizer"]),
        cfg.get("chat_template"),
        int(cfg["max_length"]),
        bool(cfg.get("packing")),
        split,
    )
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    out = _build(cfg, split)
    with _LOCK:
        _CACHE[key] = out
        while len(_CACHE) > _CACHE_SLOTS:
            _CACHE.popitem(last=False)
    return out
