"""Supervised fine-tuning: JSONL/chat data, completion-only masks, packing, the SFT recipes.

A tiny byte-level BPE tokenizer with a chat template is trained here with the
`tokenizers` library and saved, with tiny random transformers Llama and GPT-2
models, as Hugging Face folders; the references are transformers itself (chat
rendering, assistant masks, the causal-LM loss with a block-diagonal 4-D mask).
"""

import json
import os

import numpy as np
import pytest

from tests.torch_refs import import_timm

import_timm()  # first: it makes torchvision (which transformers imports) load

import jax
import tokenizers
import torch
import transformers
from tokenizers import decoders, pre_tokenizers, processors, trainers

import jft
from jft.data import chat, sft
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
            n_layer=2,
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
            num_hidden_layers=2,
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
