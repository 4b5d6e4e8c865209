"""Built-in strategies: backends that run other backends on sub-calls. Importing this package
registers them."""

from . import dilated  # noqa: F401
