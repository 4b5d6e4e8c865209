"""diffusers processor wrappers: the model's processor logic stays, its core attention call is
redirected to attnpatch (see :mod:`attnpatch.processors.rebind`)."""

from .rebind import NotRoutable, clone_function, intercept_plan, route_processor

__all__ = ["NotRoutable", "clone_function", "intercept_plan", "route_processor"]
