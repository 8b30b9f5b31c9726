"""Preprocessing ops, parsed from ``config.data.preprocess`` and applied to whole batches.

``preprocess`` is a string of ops joined by ``|``, or a sequence of op strings::

    "resize(32)|gray_to_rgb|normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))|flip_lr"
    ("random_crop(32, pad=4)", "flip_lr", "normalize(0.5, 0.5)")
    "tokenize(/path/to/tokenizer.json, max_len=128)"

An op is ``name`` or ``name(arg, ..., key=value)``; an argument is a Python literal
(number, string, tuple) or else taken as a bare string (a path needs no quotes).

Images enter as float32 in [0, 1]: the stored pixels divided by the data set's
largest value (255, or 16 for digits); ``(N, H, W, C)`` NHWC. Ops, in the order given:

- ``resize(size)`` / ``resize(height, width)``: bilinear (PIL), to ``size x size`` or
  ``height x width``. 8-bit images (pixel maximum 255) are resized as 8-bit images,
  as torchvision's ``Resize`` does on PIL images.
- ``center_crop(size)`` / ``center_crop(height, width)``.
- ``random_crop(size, pad=0)`` / ``random_crop(height, width, pad=0)``: pads each side with
  zeros by ``pad``, then crops at a random offset in training and at the centre in
  evaluation.
- ``flip_lr``: mirrors left-right with probability 1/2 in training; nothing in evaluation.
- ``gray_to_rgb``: repeats a single channel three times (3-channel images pass).
- ``normalize(mean, std)``: ``(x - mean) / std``; scalars or one value per channel.
- ``value_range(low, high)``: maps [0, 1] to [low, high].
- ``tokenize(path, max_len=128, key=None)``: encodes the text feature ``key`` (default: the
  first of ``text``, ``sentence``, ``sentence1``+``sentence2``, ``question``; a tuple of two
  keys encodes pairs) with the Hugging Face ``tokenizer.json`` at ``path``, truncated and
  padded to ``max_len``: ``input_ids``, ``attention_mask``, ``token_type_ids`` (int32).

Random ops draw from a counter-based hash of (seed, the example's position in the global
stream, the op's place in the list): the same example at the same step gets the same
crop on any number of processes and after a resume.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image

from jft.data.errors import DataError

__all__ = [
    "IMAGE_OPS",
    "TEXT_OPS",
    "Context",
    "Op",
    "apply",
    "apply_image_op",
    "load_tokenizer",
    "parse",
    "stack",
    "text_key",
    "to_float",
    "tokenize",
    "uniform",
]

IMAGE_OPS = (
    "resize",
    "center_crop",
    "random_crop",
    "flip_lr",
    "gray_to_rgb",
    "normalize",
    "value_range",
)
TEXT_OPS = ("tokenize",)
_TEXT_KEYS = ("text", "sentence", ("sentence1", "sentence2"), "question")


@dataclasses.dataclass(frozen=True)
class Op:
    """One parsed op: its name, positional and keyword arguments."""

    name: str
    args: tuple = ()
    kwargs: tuple[tuple[str, Any], ...] = ()

    def kw(self, key: str, default: Any = None) -> Any:
        """The keyword argument ``key``, or ``default``."""
        return dict(self.kwargs).get(key, default)


def _split_top(text: str, sep: str) -> list[str]:
    """Splits on ``sep`` outside brackets and quotes."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def _literal(text: str) -> Any:
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string, e.g. a path


def parse(preprocess: str | Sequence[str] | None) -> list[Op]:
    """Parses ``config.data.preprocess`` into ops.

    >>> parse("resize(32)|flip_lr")
    [Op(name='resize', args=(32,), kwargs=()), Op(name='flip_lr', args=(), kwargs=())]

    Raises:
      DataError: on an unknown op or a malformed one.
    """
    if not preprocess:
        return []
    items = _split_top(preprocess, "|") if isinstance(preprocess, str) else list(preprocess)
    ops = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        name, _, rest = item.partition("(")
        name = name.strip()
        if name not in IMAGE_OPS + TEXT_OPS:
            raise DataError(
                f"unknown preprocess op {name!r} in {item!r}; ops: "
                + ", ".join(IMAGE_OPS + TEXT_OPS)
            )
        args, kwargs = [], []
        if rest:
            if not rest.rstrip().endswith(")"):
                raise DataError(f"preprocess op {item!r}: missing ')'")
            inner = rest.rstrip()[:-1]
            for arg in _split_top(inner, ",") if inner.strip() else []:
                key, eq, value = arg.partition("=")
                if eq and key.strip().isidentifier():
                    kwargs.append((key.strip(), _literal(value)))
                else:
                    args.append(_literal(arg))
        ops.append(Op(name, tuple(args), tuple(kwargs)))
    return ops


# ----------------------------------------------------------------------------- randomness


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, positions: np.ndarray, stream: int) -> np.ndarray:
    """Uniform floats in [0, 1), one per stream position, a pure function of the inputs."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed % 2**64) ^ _splitmix64(np.uint64(stream)))
        x = _splitmix64(np.asarray(positions, dtype=np.uint64) ^ key)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


# ----------------------------------------------------------------------------- the batch


@dataclasses.dataclass
class Context:
    """What ops need besides the batch: train or eval, the seed and stream positions."""

    train: bool
    seed: int
    positions: np.ndarray
    pixel_max: float = 255.0


def _is_raw8(images: Any, ctx: Context) -> bool:
    first = images[0] if isinstance(images, list) else images
    return first.dtype == np.uint8 and ctx.pixel_max == 255.0


def to_float(images: Any, ctx: Context) -> Any:
    """Stored pixels -> float32 in [0, 1] (a no-op on float images)."""

    def one(x):
        if x.dtype == np.float32:
            return x
        return (x.astype(np.float32) / np.float32(ctx.pixel_max)).astype(np.float32)

    if isinstance(images, list):
        return [one(x) for x in images]
    if images.dtype == np.float32:
        return images
    return one(images)


def stack(images: Any, what: str = "images") -> np.ndarray:
    """A list of same-shape arrays -> one array; different shapes are an error."""
    if not isinstance(images, list):
        return images
    shapes = {x.shape for x in images}
    if len(shapes) > 1:
        raise DataError(
            f"{what} have different shapes {sorted(shapes)[:3]}...: add a resize(...) "
            "or crop op to config.data.preprocess"
        )
    return np.stack(images)


def _hw(op: Op) -> tuple[int, int]:
    if len(op.args) == 1:
        return int(op.args[0]), int(op.args[0])
    if len(op.args) == 2:
        return int(op.args[0]), int(op.args[1])
    raise DataError(f"preprocess op {op.name} takes (size) or (height, width), got {op.args}")


def _resize_one(x: np.ndarray, h: int, w: int) -> np.ndarray:
    if x.shape[:2] == (h, w):
        return x
    if x.dtype == np.uint8:
        img = PIL.Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)
        out = np.asarray(img.resize((w, h), PIL.Image.BILINEAR))
        return out.reshape(h, w, x.shape[-1])
    chans = [
        np.asarray(
            PIL.Image.fromarray(np.ascontiguousarray(x[..., c], np.float32), mode="F").resize(
                (w, h), PIL.Image.BILINEAR
            )
        )
        for c in range(x.shape[-1])
    ]
    return np.stack(chans, axis=-1).astype(np.float32)


def _crop(images: Any, tops: np.ndarray, lefts: np.ndarray, h: int, w: int) -> Any:
    if isinstance(images, list) or len(set(zip(tops.tolist(), lefts.tolist(), strict=True))) > 1:
        return [x[t : t + h, lf : lf + w] for x, t, lf in zip(images, tops, lefts, strict=True)]
    return images[:, tops[0] : tops[0] + h, lefts[0] : lefts[0] + w]


def _sizes(images: Any) -> np.ndarray:
    if isinstance(images, list):
        return np.array([x.shape[:2] for x in images])
    return np.tile(np.array(images.shape[1:3]), (len(images), 1))


def _check_crop(op: Op, sizes: np.ndarray, h: int, w: int) -> None:
    if (sizes[:, 0] < h).any() or (sizes[:, 1] < w).any():
        raise DataError(
            f"preprocess op {op.name}({h}, {w}) is larger than an image of "
            f"{tuple(sizes.min(0))}: resize first"
        )


def apply_image_op(op: Op, index: int, images: Any, ctx: Context) -> Any:
    """Applies one image op to a batch (an NHWC array, or a list of HWC arrays)."""
    name = op.name
    if name == "resize":
        h, w = _hw(op)
        if not _is_raw8(images, ctx):
            images = to_float(images, ctx)
        out = [_resize_one(x, h, w) for x in images]
        return np.stack(out)
    if name in ("center_crop", "random_crop"):
        h, w = _hw(op)
        pad = int(op.kw("pad", 0))
        if pad:
            widths = ((pad, pad), (pad, pad), (0, 0))
            if isinstance(images, list):
                images = [np.pad(x, widths) for x in images]
            else:
                images = np.pad(images, ((0, 0), *widths))
        sizes = _sizes(images)
        _check_crop(op, sizes, h, w)
        if name == "random_crop" and ctx.train:
            tops = np.floor(uniform(ctx.seed, ctx.positions, 2 * index) * (sizes[:, 0] - h + 1))
            lefts = np.floor(
                uniform(ctx.seed, ctx.positions, 2 * index + 1) * (sizes[:, 1] - w + 1)
            )
        else:
            tops, lefts = (sizes[:, 0] - h) // 2, (sizes[:, 1] - w) // 2
        return _crop(images, tops.astype(int), lefts.astype(int), h, w)
    if name == "flip_lr":
        if not ctx.train:
            return images
        flip = uniform(ctx.seed, ctx.positions, 2 * index) < 0.5
        if isinstance(images, list):
            return [x[:, ::-1] if f else x for x, f in zip(images, flip, strict=True)]
        return np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    if name == "gray_to_rgb":
        if isinstance(images, list):
            return [np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x for x in images]
        return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
    if name == "normalize":
        if len(op.args) != 2:
            raise DataError(f"preprocess op normalize takes (mean, std), got {op.args}")
        mean = np.asarray(op.args[0], np.float32)
        std = np.asarray(op.args[1], np.float32)
        images = stack(to_float(images, ctx))
        return ((images - mean) / std).astype(np.float32)
    if name == "value_range":
        if len(op.args) != 2:
            raise DataError(f"preprocess op value_range takes (low, high), got {op.args}")
        low, high = (np.float32(a) for a in op.args)
        images = stack(to_float(images, ctx))
        return (images * (high - low) + low).astype(np.float32)
    raise AssertionError(name)


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str, max_len: int):
    """A `tokenizers.Tokenizer` from ``tokenizer.json``, truncating and padding to max_len."""
    from jft.data.chat import read_tokenizer

    _, tok = read_tokenizer(path, "config.data.preprocess's tokenize(PATH, ...)")
    tok.enable_truncation(max_len)
    tok.enable_padding(length=max_len)
    return tok


def text_key(op: Op, keys: Sequence[str]) -> str | tuple[str, str]:
    """The text feature(s) that ``tokenize`` reads from a record with ``keys``."""
    key = op.kw("key")
    if key is not None:
        key = tuple(key) if isinstance(key, list | tuple) else key
        missing = [k for k in (key if isinstance(key, tuple) else (key,)) if k not in keys]
        if missing:
            raise DataError(f"tokenize: no text feature {missing[0]!r} (features: {list(keys)})")
        return key
    for cand in _TEXT_KEYS:
        if all(k in keys for k in (cand if isinstance(cand, tuple) else (cand,))):
            return cand
    raise DataError(f"tokenize: no text feature among {list(keys)}; pass key=...")


def tokenize(op: Op, columns: dict[str, Any]) -> dict[str, np.ndarray]:
    """Runs ``tokenize`` on a batch of records' columns; returns the three int32 arrays."""
    if not op.args:
        raise DataError("preprocess op tokenize needs the path of a tokenizer.json")
    max_len = int(op.kw("max_len", 128))
    tok = load_tokenizer(str(op.args[0]), max_len)
    key = text_key(op, list(columns))

    def text(values):
        return [v.decode() if isinstance(v, bytes) else str(v) for v in values]

    if isinstance(key, tuple):
        enc = tok.encode_batch(list(zip(text(columns[key[0]]), text(columns[key[1]]), strict=True)))
    else:
        enc = tok.encode_batch(text(columns[key]))
    return {
        "input_ids": np.array([e.ids for e in enc], np.int32).reshape(-1, max_len),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int32).reshape(-1, max_len),
        "token_type_ids": np.array([e.type_ids for e in enc], np.int32).reshape(-1, max_len),
    }


def apply(ops: Sequence[Op], columns: dict[str, Any], ctx: Context) -> dict[str, np.ndarray]:
    """Runs ``ops`` over a batch of decoded records; returns the model's inputs and labels.

    ``columns`` maps feature names to arrays (or lists of arrays/bytes) with one row per
    example. The result holds ``image`` (float32 NHWC) when the data have images,
    the token arrays when ``tokenize`` ran, and ``label`` (int32) when the data have labels.
    """
    out: dict[str, np.ndarray] = {}
    images = columns.get("image")
    for i, op in enumerate(ops):
        if op.name == "tokenize":
            out.update(tokenize(op, columns))
        elif images is None:
            raise DataError(f"preprocess op {op.name}: the data set has no 'image' feature")
        else:
            images = apply_image_op(op, i, images, ctx)
    if images is not None and not any(op.name == "tokenize" for op in ops):
        out["image"] = stack(to_float(images, ctx))
    if "label" in columns:
        out["label"] = np.asarray(columns["label"], np.int32)
    return out
