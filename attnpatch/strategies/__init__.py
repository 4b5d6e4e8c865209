"""Built-in strategies: backends that run other backends on sub-calls. Importing this package
registers them."""

from . import block_sparse, context_parallel, dilated  # noqa: F401
