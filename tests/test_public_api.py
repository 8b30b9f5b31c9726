"""Every public module of jft lists its public names in ``__all__``, and each listed name exists."""

import importlib
import pkgutil

import pytest

import jft

PENDING: set[str] = set()  # modules allowed to lack __all__ for a while (none now)


def _public_modules() -> list[str]:
    names = ["jft"]
    for info in pkgutil.walk_packages(jft.__path__, "jft."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(set(names) - PENDING)


MODULES = _public_modules()


def test_walk_finds_the_modules():
    assert {"jft", "jft.optim.adam", "jft.models.registry", "jft.weights.keymaps.bert"} <= set(
        MODULES
    )
    assert not [m for m in MODULES if "._" in m]


@pytest.mark.parametrize("name", MODULES)
def test_module_defines_all(name):
    module = importlib.import_module(name)
    listed = getattr(module, "__all__", None)
    assert isinstance(listed, list | tuple), f"{name} has no __all__"
    assert len(set(listed)) == len(listed), f"{name}.__all__ repeats a name"
    missing = [n for n in listed if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists names it does not define: {missing}"
    # A public function or class written in the module is listed.
    unlisted = [
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and n not in listed
        and callable(v)
        and getattr(v, "__module__", None) == name
    ]
    assert not unlisted, f"{name} defines public names missing from __all__: {unlisted}"


def test_unknown_names_are_one_error_listing_the_known():
    import jft.models
    import jft.train.losses
    import jft.weights.keymaps
    from jft.errors import UnknownNameError
    from jft.train.build import OPTIMIZERS

    cases = [
        (jft.models.get, "resnet19", "model", "resnet18"),
        (jft.weights.keymaps.get, "nosuch", "arch", "bert"),
        (jft.train.losses.get, "hinge", "loss", "softmax_xent"),
        (OPTIMIZERS.get, "adamm", "optimizer", "adam"),
    ]
    for get, name, kind, known in cases:
        with pytest.raises(UnknownNameError) as e:
            get(name)
        message = str(e.value)
        assert message.startswith(f"unknown {kind} {name!r}; known: "), message
        assert known in message.split("known: ")[1].split(", ") and "\n" not in message
        assert isinstance(e.value, ValueError)  # callers that caught ValueError still do


def test_registry_refuses_a_second_owner_of_a_name():
    from jft._registry import Registry

    table = Registry("widget")

    def make():
        return 1

    table.register("a")(make)
    table.register("a")(make)  # the same function again (a re-import) is fine
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        table.register("a")(lambda: 2)
    assert table.names() == ["a"] and table.get("a") is make and "a" in table
    with pytest.raises(KeyError, match="unknown widget 'b' \\(--widget\\); known: a"):
        table.get("b", key="--widget", error=KeyError)
