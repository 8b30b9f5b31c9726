"""Supervised fine-tuning: JSONL/chat data, completion-only masks, packing, the SFT recipes.

A tiny byte-level BPE tokenizer with a chat template is trained here with the
`tokenizers` library and saved, with tiny random transformers Llama and GPT-2
models, as Hugging Face folders; the references are transformers itself (chat
rendering, assistant masks, the causal-LM loss with a block-diagonal 4-D mask).
"""

import importlib
import json
import os
import re

import numpy as np
import pytest

from tests.torch_refs import import_timm

import_timm()  # first: it makes torchvision (which transformers imports) load

import flax
import jax
import tokenizers
import torch
import transformers
from tokenizers import decoders, pre_tokenizers, processors, trainers

import jft
from jft import cli
from jft.data import chat, sft
from jft.train import config as config_lib
from jft.train.inputs import model_args
from jft.weights import from_pretrained

SPECIAL = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# Zephyr-like, with transformers' {% generation %} markers around what the assistant writes.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
    "{% generation %}{{ m['content'] + '<|end|>\n' }}{% endgeneration %}"
    "{% else %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "the cat sat"},
]
LINES = [
    {"prompt": "translate: chat", "completion": " cat"},
    {"messages": CHAT},
    {"prompt": [{"role": "user", "content": "hi"}], "completion": [CHAT[2]]},
    {"prompt": "the cat", "completion": " sat on the mat"},
    {"messages": CHAT[1:3]},
    {"prompt": "how are", "completion": " you?"},
    {"messages": CHAT[3:]},
    {"prompt": "hello", "completion": " there, how are you?"},
]
LONG = {"prompt": "the cat", "completion": " sat" * 80}  # 84 tokens with BOS and EOS
MAX_LENGTH = 64
TOL = 1e-4


def _tokenizer() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the cat sat on the mat", "translate: chat -> cat", "hello there, how are you?"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _save_tokenizer(folder, tok, template: str | None = TEMPLATE) -> None:
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    if template is not None:
        config["chat_template"] = template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


def _hf_model(family: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=1,
            n_head=4,
            n_positions=MAX_LENGTH,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        model = transformers.LlamaForCausalLM(config)
    config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # logits of order 1, so a wrong mask or position shows
        for p in model.parameters():
            if p.ndim == 1:  # norm weights and biases away from their 1/0 init
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tokenizer, the Llama and GPT-2 folders (with it) and the JSONL file, made once."""
    root = tmp_path_factory.mktemp("sft")
    tok = _tokenizer()
    out = {"root": root, "tok": tok}
    for family in ("llama", "gpt2"):
        ref = _hf_model(family, tok.get_vocab_size())
        ref.save_pretrained(root / family)
        _save_tokenizer(root / family, tok)
        out[family] = (os.fspath(root / family), ref)
    out["jsonl"] = os.fspath(root / "data.jsonl")
    with open(out["jsonl"], "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in LINES)
    return out


def _data(files, **changes):
    cfg = dict(
        name="sft",
        path=files["jsonl"],
        tokenizer=files["llama"][0],
        max_length=MAX_LENGTH,
        packing=True,
        train_split="train",
        eval_split="train[:2]",
        batch_size=2,
    )
    return {**cfg, **changes}


def test_chat_text_and_assistant_masks_equal_transformers(files):
    folder = files["llama"][0]
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    ours = chat.load(folder)
    for add in (False, True):
        assert ours.render(CHAT, add) == ref.apply_chat_template(
            CHAT, tokenize=False, add_generation_prompt=add
        )
    want = ref.apply_chat_template(
        CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, learn = ours.encode_chat(CHAT)
    assert ids.tolist() == list(want["input_ids"])
    assert learn.tolist() == list(want["assistant_masks"])  # found without the markers
    assert ref.decode(ids[learn == 1]) == "hello there<|end|>\nthe cat sat<|end|>\n"
    ids, learn = ours.encode_completion("translate: chat", " cat")
    assert ids[0] == ref.bos_token_id and ids[-1] == ref.eos_token_id
    assert ref.decode(ids[learn == 1]) == " cat</s>"


def test_rows_pack_examples_and_resume_exactly(files):
    cfg = _data(files)
    info = jft.data.info(cfg)
    rows = sft.open_split(jft.data.config.resolve(cfg), "train")
    assert rows.num_documents == len(LINES)
    assert info.num_examples["train"] == len(rows.indices) < len(LINES)
    seg, learn = rows.columns["attention_mask"], rows.columns["loss_mask"]
    starts = (seg > 0) & (seg != np.pad(seg[:, :-1], ((0, 0), (1, 0))))
    assert starts.sum() == len(LINES)  # every example once, none cut
    assert not learn[starts].any() and not learn[seg == 0].any()
    assert (np.diff(seg, axis=1)[seg[:, 1:] > 0] >= 0).all()  # segments 1, 2, ... in order
    alone = sft.open_split(jft.data.config.resolve(_data(files, packing=False)), "train")
    assert alone.columns["loss_mask"].sum() == learn.sum()

    pipeline = jft.data.get(cfg, "train", train=True, seed=3, process_count=1, process_index=0)
    first = [next(pipeline) for _ in range(2)]
    state = pipeline.get_state()
    want = next(pipeline)
    again = jft.data.get(cfg, "train", train=True, seed=3, process_count=1, process_index=0)
    again.set_state(state)
    got = next(again)
    assert set(got) == {"input_ids", "attention_mask", "loss_mask"}
    for k in got:
        assert np.array_equal(got[k], want[k])
    assert not all(np.array_equal(first[0][k], first[1][k]) for k in got)


def test_packed_logits_equal_each_example_alone(files):
    model, variables = from_pretrained(files["llama"][0])
    rows = sft.open_split(jft.data.config.resolve(_data(files)), "train").columns
    ids, seg = rows["input_ids"][:2], rows["attention_mask"][:2]
    where = [(r, seg[r] == s) for r in range(2) for s in range(1, seg[r].max() + 1)]
    alone = np.zeros((len(where), MAX_LENGTH), np.int32)  # each example alone, right-padded
    for i, (r, w) in enumerate(where):
        alone[i, : w.sum()] = ids[r, w]
    # One batch, so one compile: packed rows, the examples alone, packed rows as one document.
    batch = np.concatenate([ids, alone, ids])
    masks = np.concatenate([seg, (alone > 0).astype(np.int32), (seg > 0).astype(np.int32)])
    logits = np.asarray(jax.jit(model.apply)(variables, batch, masks))
    packed, merged = logits[:2], logits[2 + len(where) :]
    for i, (r, w) in enumerate(where):
        assert np.abs(packed[r, w] - logits[2 + i, : w.sum()]).max() < 1e-5
    assert len(where) >= 4 and np.abs(packed).max() > 0.5
    # Without the segment ids (one long document) the later examples' logits differ.
    assert np.abs(merged[seg == 2] - packed[seg == 2]).max() > 1e-2


def _torch_loss(ref: torch.nn.Module, batch) -> float:
    """transformers' causal-LM loss of a packed batch: a block-diagonal causal 4-D mask,
    position ids restarting per example, labels -100 where the loss mask is 0."""
    seg = batch["attention_mask"]
    t = seg.shape[1]
    causal = np.tril(np.ones((t, t), bool))
    allow = (seg[:, :, None] == seg[:, None, :]) & causal & (seg[:, None, :] > 0)
    allow |= np.eye(t, dtype=bool)  # padding rows attend to themselves (not counted)
    mask = torch.where(torch.tensor(allow)[:, None], 0.0, torch.finfo(torch.float32).min)
    starts = (seg > 0) & (seg != np.pad(seg[:, :-1], ((0, 0), (1, 0))))
    index = np.arange(t)
    begin = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    labels = np.where(batch["loss_mask"] == 1, batch["input_ids"], -100)
    with torch.no_grad():
        out = ref(
            input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=mask,
            position_ids=torch.tensor(index - begin),
            labels=torch.tensor(labels, dtype=torch.long),
        )
    return float(out.loss)


def _recipe(files, mode: str = "full", family: str = "llama"):
    """configs/<family>_sft.py:<mode> on the tiny folder and file, resolved as jft train does."""
    config = importlib.import_module(f"jft.configs.{family}_sft").get_config(mode)
    config.init.path = files[family][0]
    config.data.path = files["jsonl"]
    config.data.max_length, config.data.batch_size = MAX_LENGTH, 2
    config.data.train_split, config.data.eval_split = "train", "train[:2]"
    config.schedule.warmup_steps = 0
    return config_lib.resolve(config)


def test_sft_step_loss_equals_transformers(files):
    """The loss an SFT train step minimizes (the recipe's model and loss, the pipeline's first
    packed batch) equals transformers'. A compiled train step costs ~8x this forward pass'
    compile on a CPU; jft.train's steps are tested elsewhere with causal_lm_xent."""
    config = _recipe(files)
    assert config.data.tokenizer == files["llama"][0]  # the folder's, from init.path
    model = config_lib.build_model(config, 0)  # model.name "pretrained": init.path's config
    _, variables = from_pretrained(config.init.path)
    loss_fn = jft.train.losses.get(config.loss.name, label_smoothing=0.0)
    pipeline = jft.data.get(config.data, "train", train=True, seed=0, process_count=1)
    batch = next(pipeline)
    assert (batch["attention_mask"] > 1).any() and 0 < batch["loss_mask"].mean() < 0.7
    _, kwargs = model_args(None, batch)
    assert set(kwargs) == {"input_ids", "attention_mask"}  # what the train step passes
    loss = jax.jit(lambda v, b: loss_fn(model.apply(v, **model_args(None, b)[1]), b))
    assert abs(float(loss(variables, batch)) - _torch_loss(files["llama"][1], batch)) < TOL


@pytest.mark.parametrize(
    ("family", "mode", "want"),
    [
        ("llama", "lora", r"backbone/layers_\d/attention/(q|v)_proj/lora_\w+"),
        ("gpt2", "lora", r"backbone/layers_\d/attn/c_attn/lora_\w+"),
        ("llama", "frozen", r"backbone/embed_tokens/embedding"),
        ("gpt2", "frozen", r"backbone/(wte|wpe)/embedding"),
    ],
    ids=["llama-lora", "gpt2-lora", "llama-frozen", "gpt2-frozen"],
)
def test_recipe_modes_train_their_parts(files, family, mode, want):
    """LoRA trains q/v adapters only, frozen leaves the embeddings out (shapes, no compile)."""
    config = _recipe(files, mode, family)
    model = config_lib.build_model(config, 0)
    ids = np.ones((1, 8), np.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids))
    trainable, frozen = jft.partition.split(variables["params"], config_lib.build_rules(config))
    train = set(flax.traverse_util.flatten_dict(trainable, sep="/"))
    fixed = set(flax.traverse_util.flatten_dict(frozen, sep="/"))
    lora, base = (train, fixed) if mode == "lora" else (fixed, train)
    assert lora and all(re.fullmatch(want, p) for p in lora), lora
    assert len(base) > 10 and not any(re.fullmatch(want, p) for p in base)


@pytest.mark.parametrize(
    ("line", "template", "message"),
    [
        ({"messages": CHAT}, None, "has no chat template"),
        (["prompt", "completion"], TEMPLATE, "line 2: expected"),
        (LONG, TEMPLATE, "takes 84 tokens, more than config.data.max_length=64"),
    ],
    ids=["no-template", "not-an-object", "too-long"],
)
def test_bad_input_is_one_line(files, tmp_path, line, template, message):
    folder = tmp_path / "tokenizer"
    _save_tokenizer(folder, files["tok"], template)
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(LINES[0]) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(jft.data.DataError) as e:
        jft.data.info(_data(files, path=os.fspath(data), tokenizer=os.fspath(folder)))
    assert message in str(e.value) and f"{data} line 2" in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_bad_input_from_the_command_line(files, tmp_path, capsys):
    """`jft train` with the recipe: exit status 2, one line naming what to set, nothing written."""
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(LONG) + "\n")
    workdir = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--config",
            "configs/llama_sft.py",
            "--workdir",
            str(workdir),
            f"--config.init.path={files['llama'][0]}",
            f"--config.data.path={data}",
            "--config.data.train_split=train",
            "--config.data.eval_split=train",
            f"--config.data.max_length={MAX_LENGTH}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{data} line 1" in err and "set config.data.max_length=84 or more" in err
    assert not workdir.exists() or not any(workdir.iterdir())
