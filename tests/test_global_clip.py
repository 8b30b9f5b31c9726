"""config.clip_grad_norm clips by the norm of every trainable gradient, across rule groups."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from jft import partition
from jft.train import config as config_lib

CLIP = 1.0


def _config_rules():
    # Two trained groups at different rates (the head at 10x), and a frozen trunk.
    c = config_lib.default_config()
    # heavy_ball is linear in the gradient, so any other clipping factor shows.
    c.optimizer = {"name": "heavy_ball", "lr": 1e-2, "momentum": 0.9}
    c.frozen = ("trunk/.*",)
    c.rules = (("head/.*", {"lr": 1e-1}),)
    c.clip_grad_norm = CLIP
    return config_lib.build_rules(config_lib.resolve(c))


def _grads(rng, scale):
    g = {
        "trunk": {"w": rng.normal(size=(3, 3)) * 100.0},  # frozen: must not count in the norm
        "head": {"w": rng.normal(size=(3, 2)) * scale},
        "body": {"w": rng.normal(size=(4,)) * scale},
    }
    return jax.tree.map(lambda x: x.astype(np.float32), g)


def test_clip_grad_norm_is_global_over_all_trainable_groups_as_torch():
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: x.astype(np.float32),
        {
            "trunk": {"w": np.ones((3, 3))},
            "head": {"w": rng.normal(size=(3, 2))},
            "body": {"w": rng.normal(size=(4,))},
        },
    )
    # Norms below and above the clip: steps that keep the gradient and steps that scale it.
    grads = [_grads(rng, s) for s in (0.1, 3.0, 0.2, 5.0)]

    tx = partition.optimizer(_config_rules())
    update = jax.jit(tx.update)
    state, p = tx.init(params), params
    ours = []
    for g in grads:
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
        ours.append(p)

    head = torch.tensor(np.asarray(params["head"]["w"]), requires_grad=True)
    body = torch.tensor(np.asarray(params["body"]["w"]), requires_grad=True)
    opt = torch.optim.SGD(
        [{"params": [head], "lr": 1e-1}, {"params": [body], "lr": 1e-2}], momentum=0.9
    )
    clipped = []
    for g, want in zip(grads, ours, strict=True):
        head.grad = torch.tensor(np.asarray(g["head"]["w"]))
        body.grad = torch.tensor(np.asarray(g["body"]["w"]))
        norm = torch.nn.utils.clip_grad_norm_([head, body], CLIP)
        clipped.append(float(norm) > CLIP)
        opt.step()
        np.testing.assert_allclose(want["head"]["w"], head.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(want["body"]["w"], body.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(want["trunk"]["w"], params["trunk"]["w"])
    assert clipped == [False, True, False, True]


def test_clip_by_global_norm_scales_every_group_by_one_factor():
    # Plain SGD makes the update the clipped gradient itself: an explicit reference.
    clip = optax.chain(partition.clip_by_global_norm(CLIP), optax.sgd(1.0))
    rules = [("frozen/.*", None), ("a/.*", clip), ("b/.*", clip)]
    g = {
        "frozen": {"w": jnp.full(3, 50.0)},
        "a": {"w": jnp.array([3.0])},
        "b": {"w": jnp.array([4.0])},
    }
    tx = partition.optimizer(rules)
    u, _ = tx.update(g, tx.init(g), g)
    # Global norm of the trained groups: 5, so each is scaled by 1/5; frozen get zeros.
    np.testing.assert_allclose(u["a"]["w"], [-0.6], rtol=1e-6)
    np.testing.assert_allclose(u["b"]["w"], [-0.8], rtol=1e-6)
    np.testing.assert_array_equal(u["frozen"]["w"], jnp.zeros(3))
    # Alone (no partition), it is optax's clip_by_global_norm.
    alone, _ = partition.clip_by_global_norm(CLIP).update(g, optax.EmptyState())
    want, _ = optax.clip_by_global_norm(CLIP).update(g, optax.EmptyState())
    jax.tree.map(np.testing.assert_array_equal, alone, want)
