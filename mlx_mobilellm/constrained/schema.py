"""JSON Schema to nodes: check_schema, and the compiler that turns the subset it accepts into
the nodes of nodes.py (refusing, never ignoring, any keyword outside it)."""

from __future__ import annotations

import json
from typing import Dict, List, Optional
from urllib.parse import unquote

from .automaton import accepts
from .nodes import (ANY, ANY_OBJECT, ArrayNode, ChoiceNode, LiteralNode, NumberNode, ObjectNode,
                    StringNode, UnionNode)

_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "deprecated",
                          "readOnly", "writeOnly", "$schema", "$id", "$comment", "$defs",
                          "definitions"})
"""Keywords that do not constrain the value: accepted and ignored."""
_KEYWORDS = frozenset({"type", "nullable", "enum", "const", "anyOf", "$ref", "properties",
                       "required", "additionalProperties", "items", "minItems", "maxItems",
                       "minLength", "maxLength"})
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class _Compiler:
    def __init__(self, root):
        self.root = root
        self.refs: Dict[str, object] = {}
        self.open_refs: List[str] = []

    def node(self, schema, path: str):
        if schema is True:
            return ANY
        if schema is False:
            raise ValueError(f"the schema at {path} is false: no value satisfies it")
        if not isinstance(schema, dict):
            raise ValueError(f"the schema at {path} must be an object or a boolean, "
                             f"not {type(schema).__name__}")
        unknown = sorted(set(schema) - _KEYWORDS - _ANNOTATIONS)
        if unknown:
            raise ValueError(f"unsupported JSON Schema keyword '{unknown[0]}' at {path}; "
                             f"constrained decoding supports {', '.join(sorted(_KEYWORDS))}")
        for keyword, where in (("$ref", "the referenced schema"), ("anyOf", "each alternative")):
            if keyword in schema:
                others = sorted(set(schema) & _KEYWORDS - {keyword})
                if others:
                    raise ValueError(f"'{keyword}' at {path} must stand alone (but for "
                                     f"annotations): move '{others[0]}' into {where}")
                if keyword == "$ref":
                    return self.ref(schema["$ref"], path)
                return self.any_of(schema["anyOf"], path)
        if "enum" in schema or "const" in schema:
            return self.enum(schema, path)
        return self.typed(schema, path)

    def ref(self, ref, path: str):
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise ValueError(f"'$ref' at {path} is {ref!r}: only references into the schema "
                             "itself (#/$defs/NAME) are supported")
        if ref in self.open_refs:
            raise ValueError(f"'$ref' {ref!r} at {path} is recursive, which is not supported")
        if ref not in self.refs:
            target = self.root
            for part in ref[2:].split("/") if ref != "#" else ():
                part = unquote(part).replace("~1", "/").replace("~0", "~")
                if isinstance(target, dict) and part in target:
                    target = target[part]
                elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                    target = target[int(part)]
                else:
                    raise ValueError(f"'$ref' {ref!r} at {path} points to nothing in the schema")
            self.open_refs.append(ref)
            self.refs[ref] = self.node(target, ref)
            self.open_refs.pop()
        return self.refs[ref]

    def any_of(self, options, path: str):
        if not isinstance(options, list) or not options:
            raise ValueError(f"'anyOf' at {path} must be a non-empty array of schemas")
        return UnionNode(tuple(self.node(option, f"{path}/anyOf/{i}")
                               for i, option in enumerate(options)))

    def enum(self, schema: dict, path: str):
        if "enum" in schema and "const" in schema:
            raise ValueError(f"'enum' and 'const' together at {path} are not supported: keep one")
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list) or not values:
            raise ValueError(f"'enum' at {path} must be a non-empty array")
        # The other keywords (type, minLength, ...) filter the values: the automaton of the
        # schema without enum/const is the validator.
        rest = self.typed({k: v for k, v in schema.items() if k not in ("enum", "const")}, path)
        texts = []
        for value in values:
            try:
                text = json.dumps(value, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError):
                raise ValueError(f"'enum' at {path} holds {value!r}, which is not JSON") from None
            if accepts(rest, text):
                texts.append(text)
        if not texts:
            raise ValueError(f"no value of 'enum' or 'const' at {path} satisfies its other "
                             "keywords")
        strings = frozenset(json.loads(text) for text in texts if text.startswith('"'))
        others = tuple(dict.fromkeys(text for text in texts if not text.startswith('"')))
        if strings and others:
            return UnionNode((ChoiceNode(strings), LiteralNode(others)))
        return ChoiceNode(strings) if strings else LiteralNode(others)

    def typed(self, schema: dict, path: str):
        types = schema.get("type", [t for t in _TYPES if t != "integer"])
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or not types or any(t not in _TYPES for t in types):
            raise ValueError(f"'type' at {path} must be one of {', '.join(_TYPES)} or a "
                             f"non-empty array of them, not {types!r}")
        nullable = schema.get("nullable", False)
        if not isinstance(nullable, bool):
            raise ValueError(f"'nullable' at {path} must be true or false, not {nullable!r}")
        types = types + ["null"] * nullable
        if "number" in types:
            types = [t for t in types if t != "integer"]
        nodes = [self.of_type(t, schema, path) for t in dict.fromkeys(types)]
        return nodes[0] if len(nodes) == 1 else UnionNode(tuple(nodes))

    def of_type(self, kind: str, schema: dict, path: str):
        if kind == "object":
            return self.object(schema, path)
        if kind == "array":
            items = schema.get("items", True)
            if isinstance(items, list):
                raise ValueError(f"'items' at {path} is an array (one schema per position), "
                                 "which is not supported: give one schema for every item")
            low, high = self.bounds(schema, "minItems", "maxItems", path)
            return ArrayNode(self.node(items, f"{path}/items"), low, high)
        if kind == "string":
            return StringNode(*self.bounds(schema, "minLength", "maxLength", path))
        if kind in ("number", "integer"):
            return NumberNode(kind == "integer")
        return LiteralNode(("true", "false") if kind == "boolean" else ("null",))

    @staticmethod
    def bounds(schema: dict, low_key: str, high_key: str, path: str):
        def whole(key: str, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"'{key}' at {path} must be a whole number >= 0, not {value!r}")
            return value

        low = whole(low_key, schema.get(low_key, 0))
        high = whole(high_key, schema[high_key]) if high_key in schema else None
        if high is not None and low > high:
            raise ValueError(f"'{low_key}' ({low}) is above '{high_key}' ({high}) at {path}: no "
                             "value satisfies both")
        return low, high

    def object(self, schema: dict, path: str) -> ObjectNode:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise ValueError(f"'properties' at {path} must be an object of schemas")
        nodes = {name: self.node(sub, f"{path}/properties/{name}")
                 for name, sub in properties.items()}
        extra = schema.get("additionalProperties", True)
        extra = None if extra is False else self.node(extra, f"{path}/additionalProperties")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(n, str) for n in required):
            raise ValueError(f"'required' at {path} must be an array of property names")
        for name in required:
            if name not in nodes:
                if extra is None:
                    raise ValueError(f"'required' at {path} names '{name}', which is not in "
                                     "'properties' while additionalProperties is false: no "
                                     "object satisfies both")
                nodes[name] = extra  # tracked like a property, so that it is counted
        return ObjectNode(nodes, frozenset(required), extra)


def compile_schema(schema: Optional[dict]):
    return ANY_OBJECT if schema is None else _Compiler(schema).node(schema, "#")


def check_schema(schema: Optional[dict]) -> None:
    """Raise ValueError (one line: the keyword and where) for a schema json_processor cannot
    enforce: keywords outside the subset (type, properties, required, additionalProperties,
    items, minItems, maxItems, minLength, maxLength, enum, const, anyOf, $ref, nullable;
    annotations such as description are ignored), recursive or outside $ref, anyOf or $ref
    beside other keywords, and schemas no value satisfies. None (any JSON object) passes."""
    compile_schema(schema)
