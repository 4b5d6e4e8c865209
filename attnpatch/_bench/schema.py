"""The schema of ``results.json`` (a JSON-Schema dict) and a small validator for the subset of
JSON Schema it uses (``type``, ``required``, ``properties``, ``items``, ``enum``,
``additionalProperties``); ``jsonschema`` also checks it when installed."""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 2
SUITES = ("kernels", "models", "sparse", "parallel")

#: a metric: a scalar, or a list of numbers (e.g. the per-layer errors of a model forward)
_METRIC = {"type": ["number", "integer", "string", "boolean", "null", "array"],
           "items": {"type": ["number", "null"]}}
ROW = {
    "type": "object",
    "required": ["suite", "name", "variant", "shape", "metrics", "skipped"],
    "properties": {
        "suite": {"type": "string", "enum": list(SUITES)},
        "name": {"type": "string"},
        "variant": {"type": "string"},
        "shape": {"type": ["array", "string", "null"], "items": {"type": "integer"}},
        "metrics": {"type": "object", "additionalProperties": _METRIC},
        "skipped": {"type": ["string", "null"]},
        # what a filtered run replaces (--models: the model key; --processes: "N=<n>")
        "group": {"type": ["string", "null"]},
        "options": {"type": "object"},
    },
}
MACHINE = {
    "type": "object",
    "required": ["platform", "cpu", "gpu", "cuda", "torch", "diffusers", "transformers",
                 "date"],
    "properties": {
        "platform": {"type": "string"}, "cpu": {"type": "string"},
        "gpu": {"type": "string"}, "cuda": {"type": ["string", "null"]},
        "driver": {"type": ["string", "null"]},
        "torch": {"type": "string"}, "diffusers": {"type": ["string", "null"]},
        "transformers": {"type": ["string", "null"]}, "date": {"type": "string"},
    },
}
CONFIG = {
    "type": "object",
    "required": ["suites", "quick", "device", "model"],
    "properties": {
        "suites": {"type": "array", "items": {"type": "string", "enum": list(SUITES)}},
        "quick": {"type": "boolean"}, "device": {"type": "string"},
        "model": {"type": ["string", "null"]},
        "budget_s": {"type": "number"},
        "models": {"type": "array", "items": {"type": "string"}},
        "resolutions": {"type": "integer"},
        "time_limit_s": {"type": "number"},
    },
}
#: one run that wrote rows of a suite (all of them, or the listed groups), with its machine
RUN = {
    "type": "object",
    "required": ["suite", "groups", "machine", "config"],
    "properties": {
        "suite": {"type": "string", "enum": list(SUITES)},
        "groups": {"type": ["array", "null"], "items": {"type": "string"}},
        "machine": MACHINE, "config": CONFIG,
        "elapsed_s": {"type": "number"},  # the suite's wall-clock time in that run
    },
}
SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "attnpatch bench results",
    "type": "object",
    "required": ["schema_version", "machine", "config", "runs", "rows", "charts"],
    "properties": {
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "machine": MACHINE,
        "config": CONFIG,
        "runs": {"type": "array", "items": RUN},
        "rows": {"type": "array", "items": ROW},
        "charts": {"type": "array", "items": {"type": "string"}},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def _errors(value: Any, schema: dict, path: str) -> list[str]:
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(value, k) for k in kinds):
            return [f"{path}: {type(value).__name__} is not of type {'/'.join(kinds)}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        errors += [f"{path}: missing required key {key!r}" for key in schema.get("required", ())
                   if key not in value]
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                errors += _errors(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                errors += _errors(item, extra, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += _errors(item, schema["items"], f"{path}[{i}]")
    return errors


def validate(results: dict) -> list[str]:
    """The ways ``results`` breaks :data:`SCHEMA` (empty when valid)."""
    errors = _errors(results, SCHEMA, "results")
    try:
        import jsonschema
    except ImportError:
        return errors
    validator = jsonschema.validators.validator_for(SCHEMA)(SCHEMA)
    return errors + [f"results.{'.'.join(map(str, e.absolute_path))}: {e.message}"
                     for e in validator.iter_errors(results)]
