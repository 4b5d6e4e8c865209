"""Built-in backends. Importing this package registers them."""

from . import flex, math, sdpa  # noqa: F401
