"""A model folder's tokenizer and chat template, read offline (:func:`load`).

The tokenizer is the folder's ``tokenizer.json`` (the `tokenizers` library); its
special tokens and chat template come from ``tokenizer_config.json`` (or the
``chat_template.jinja`` file that transformers 5 writes). Templates are rendered
with jinja2 in the environment transformers' ``apply_chat_template`` uses
(sandboxed, ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``,
``raise_exception``, ``tojson``, ``strftime_now``), so the text is the same.

:meth:`ChatTokenizer.encode_chat` also says which tokens the assistant wrote: the
template is rendered for each prefix of the conversation, and the characters that
an assistant message adds after its generation prompt are the ones to learn.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers

from jft._json import read_object
from jft.data.errors import DataError

__all__ = ["ChatTokenizer", "load", "read_tokenizer"]

Message = Mapping[str, Any]
_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


@functools.cache
def _environment():
    try:
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:  # transformers needs it too; jft only for chat templates
        raise DataError("chat templates need jinja2: pip install jinja2") from None

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env, jinja2.exceptions.TemplateError


class ChatTokenizer:
    """A `tokenizers.Tokenizer` with its special tokens and (optional) chat template.

    Attributes:
      path: where it was read from.
      tokenizer: the `tokenizers.Tokenizer`.
      chat_template: the jinja template string, or None.
      special: ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token`` -> text (when set).
      eos_id: the id of the end-of-sequence token, or None.
      pad_id: the id that fills padding (the pad token, else the EOS token, else 0).
    """

    def __init__(
        self,
        path: str,
        tokenizer: tokenizers.Tokenizer,
        chat_template: str | None,
        special: Mapping[str, str],
    ):
        self.path = path
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special = dict(special)
        ids = {k: tokenizer.token_to_id(v) for k, v in self.special.items()}
        self.eos_id = ids.get("eos_token")
        pad = ids.get("pad_token")
        self.pad_id = int(pad if pad is not None else self.eos_id or 0)

    def encode_completion(self, prompt: str, completion: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, learn)``: the prompt (with the tokenizer's special tokens), the
        completion and the EOS token; ``learn`` is 1 on the completion and EOS."""
        head = self.tokenizer.encode(prompt, add_special_tokens=True).ids
        tail = self.tokenizer.encode(completion, add_special_tokens=False).ids
        if self.eos_id is not None and (not tail or tail[-1] != self.eos_id):
            tail = [*tail, self.eos_id]
        learn = np.r_[np.zeros(len(head), np.int32), np.ones(len(tail), np.int32)]
        return np.asarray(head + tail, np.int32), learn

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The chat template's text of ``messages`` (as ``apply_chat_template(tokenize=False)``).

        Raises:
          DataError: no chat template, or the template refused the messages.
        """
        if self.chat_template is None:
            raise DataError(
                f"the tokenizer at {self.path} has no chat template (tokenizer_config.json "
                "'chat_template' or chat_template.jinja), which chat 'messages' need: set "
                "config.data.chat_template to a template string or .jinja file, or write "
                "'prompt'/'completion' lines"
            )
        env, template_error = _environment()
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special
            )
        except template_error as e:
            raise DataError(f"the chat template refused the messages: {e}") from None

    def encode_chat(
        self, messages: Sequence[Message], learn_from: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, learn)`` of the rendered conversation; ``learn`` is 1 on the tokens of
        the assistant messages at index ``learn_from`` or later (their text and whatever
        the template closes them with, such as an end-of-turn token).

        Raises:
          DataError: as :meth:`render`, or a template whose text for a prefix of the
            conversation does not begin the whole conversation's text.
        """
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if i < learn_from or message.get("role") != "assistant":
                continue
            start = self.render(messages[:i], add_generation_prompt=True)
            end = self.render(messages[: i + 1])
            if not (end.startswith(start) and text.startswith(end)):
                raise DataError(
                    "the chat template renders a conversation's beginning differently from "
                    f"the whole conversation (message {i}), so the assistant's tokens cannot "
                    "be found: use 'prompt'/'completion' lines or another config.data.chat_template"
                )
            spans.append((len(start), len(end)))
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        starts = np.asarray([s for s, _ in encoding.offsets], np.int64).reshape(-1)
        learn = np.zeros(len(starts), np.int32)
        for a, b in spans:
            learn[(starts >= a) & (starts < b)] = 1
        return np.asarray(encoding.ids, np.int32), learn


def read_tokenizer(path: str | os.PathLike, key: str) -> tuple[str, tokenizers.Tokenizer]:
    """``(folder, tokenizer)`` from a model folder's ``tokenizer.json``, or the file itself.

    Raises:
      DataError: one line: no ``tokenizer.json`` there (``key`` is the config key
        to set), or a file ``tokenizers`` cannot read.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        folder, file = path, os.path.join(path, "tokenizer.json")
    else:
        folder, file = os.path.dirname(path), path
    if not os.path.isfile(file):
        raise DataError(
            f"no tokenizer.json at {path}: set {key} to the model folder (or its tokenizer.json)"
        )
    try:
        return folder, tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises plain Exceptions
        raise DataError(f"{file}: not a tokenizers file ({str(e).splitlines()[0]})") from None


def load(path: str, chat_template: str | None = None) -> ChatTokenizer:
    """The tokenizer of a model folder, or of a ``tokenizer.json`` file.

    Args:
      path: a folder with ``tokenizer.json`` (and ``tokenizer_config.json``,
        ``chat_template.jinja`` when it has them), or the ``tokenizer.json`` itself.
      chat_template: a template string or the path of a ``.jinja`` file; replaces the
        folder's.

    Raises:
      DataError: no tokenizer there, or a file that cannot be read.
    """
    folder, tokenizer = read_tokenizer(path, "config.data.tokenizer")
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = read_object(config_path, DataError) if os.path.isfile(config_path) else {}
    special = {k: t for k in _SPECIAL if (t := _token_text(config.get(k))) is not None}
    template = config.get("chat_template")
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file) as f:
            template = f.read()
    if chat_template:
        template = chat_template
        if chat_template.endswith(".jinja") and os.path.isfile(chat_template):
            with open(chat_template) as f:
                template = f.read()
    if isinstance(template, list):  # several named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return ChatTokenizer(path, tokenizer, template if isinstance(template, str) else None, special)
