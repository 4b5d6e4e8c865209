"""Built-in backends. Importing this package registers them."""

from . import flash, flex, math, sdpa, xformers  # noqa: F401
