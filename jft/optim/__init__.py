"""Update rules as pure functions, each an ``optax.GradientTransformation``."""

__all__: list[str] = []
