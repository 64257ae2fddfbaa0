"""Tools a model may call while it answers: what a tool is, how it is described, and how it is run.

A tool is a function with a name, a one-line description and JSON-schema parameters (the shape of an
OpenAI function definition). The model sees each tool as one line of the system turn
(``describe``) and calls one by writing its name and JSON arguments between the tool tokens; the engine
runs it through a ``ToolBox``, which bounds its time and the size of what it returns and turns every
failure into an ``error: ...`` string, so a broken tool or a bad call never stops a conversation.

Only a small part of JSON Schema is understood (``type``, ``properties``, ``required``, ``enum``,
``items``, ``description``): enough to check the arguments a model writes, and to refuse a schema a
client sends that this server could not check.
"""
from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from gptlab.errors import GptlabError

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")   # OpenAI's function-name alphabet
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
              "object": dict, "null": type(None)}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict                      # JSON schema of the arguments object
    fn: Callable[[dict, float], str] | None = None   # (arguments, deadline as time.monotonic()) -> text

    def spec(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


# ----- schemas ------------------------------------------------------------------------------------------
def schema_problem(schema, where: str = "parameters") -> str | None:
    """Why ``schema`` is not a JSON schema this module can check, or None when it is."""
    if not isinstance(schema, dict):
        return f"{where} must be a JSON schema object"
    t = schema.get("type")
    types = t if isinstance(t, list) else [t] if t is not None else []
    for one in types:
        if one not in JSON_TYPES:
            return f"{where}.type {one!r} is not a JSON-schema type"
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        return f"{where}.enum must be a non-empty list"
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            return f"{where}.properties must be an object"
        for k, v in props.items():
            if (p := schema_problem(v, f"{where}.properties.{k}")) is not None:
                return p
    req = schema.get("required")
    if req is not None and (not isinstance(req, list) or not all(isinstance(r, str) for r in req)):
        return f"{where}.required must be a list of property names"
    if "items" in schema and (p := schema_problem(schema["items"], f"{where}.items")) is not None:
        return p
    return None


def check_spec(spec, where: str = "tool") -> dict:
    """A function definition {name, description?, parameters?} checked and normalised; GptlabError if bad."""
    if not isinstance(spec, dict):
        raise GptlabError(f"{where} must be an object with a \"name\"")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise GptlabError(f"{where}.name must match {NAME.pattern} (got {name!r})")
    desc = spec.get("description", "")
    if not isinstance(desc, str):
        raise GptlabError(f"{where}.description must be a string")
    params = spec.get("parameters", {"type": "object", "properties": {}})
    if (p := schema_problem(params, f"{where}.parameters")) is not None:
        raise GptlabError(p)
    if params.get("type", "object") != "object":
        raise GptlabError(f"{where}.parameters must describe an object (\"type\": \"object\")")
    return {"name": name, "description": desc, "parameters": params}


def argument_problems(schema: dict, value, where: str = "arguments") -> list[str]:
    """What is wrong with ``value`` under ``schema`` (empty when it matches)."""
    out: list[str] = []
    t = schema.get("type")
    types = t if isinstance(t, list) else [t] if t else []
    if types:
        ok = any(isinstance(value, JSON_TYPES[x]) and not (x in ("integer", "number") and isinstance(value, bool))
                 for x in types)
        if not ok:
            return [f"{where} should be {'/'.join(types)}"]
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where} should be one of {schema['enum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for r in schema.get("required", []):
            if r not in value:
                out.append(f"{where}.{r} is required")
        for k, v in value.items():
            if k in props:
                out += argument_problems(props[k], v, f"{where}.{k}")
            elif props or schema.get("additionalProperties") is False:   # an invented parameter
                out.append(f"{where}.{k} is not a parameter")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            out += argument_problems(schema["items"], v, f"{where}[{i}]")
    return out


def _type_text(schema: dict) -> str:
    if "enum" in schema:
        return "|".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"])
    t = schema.get("type", "any")
    return "|".join(t) if isinstance(t, list) else str(t)


def describe(spec: dict) -> str:
    """One line a model reads: ``name(a: string, b?: integer) - description`` (``?``: optional)."""
    params = spec.get("parameters") or {}
    required = set(params.get("required", []))
    args = ", ".join(f"{k}{'' if k in required else '?'}: {_type_text(v)}"
                     for k, v in (params.get("properties") or {}).items())
    desc = " ".join(spec.get("description", "").split())
    return f"{spec['name']}({args})" + (f" - {desc}" if desc else "")


# ----- calls as text ------------------------------------------------------------------------------------
def format_call(name: str, arguments: dict) -> str:
    """What the model writes between the tool tokens: the name, a space, the arguments as JSON."""
    return f"{name} {json.dumps(arguments, ensure_ascii=False)}"


def parse_call(text: str) -> tuple[str, dict]:
    """(name, arguments) from a call's text; ValueError saying what is wrong."""
    text = text.strip()
    m = re.match(r"([A-Za-z_][A-Za-z0-9_-]*)\s*", text)
    if not m:
        raise ValueError("a tool call starts with the tool's name")
    rest = text[m.end():] or "{}"
    try:
        args = json.loads(rest)
    except json.JSONDecodeError as e:
        raise ValueError(f"the arguments are not JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise ValueError("the arguments must be a JSON object")
    return m.group(1), args


# ----- running tools ------------------------------------------------------------------------------------
@dataclass
class ToolBox:
    """The tools enabled for a conversation, each run with a time limit and its output cut to size.

    ``run`` never raises: an unknown tool, arguments that do not match the schema, an exception or a
    timeout all come back as ``error: ...`` text the model reads like any other result.
    """
    tools: dict[str, Tool] = field(default_factory=dict)
    timeout_s: float = 5.0
    max_chars: int = 1000

    def specs(self) -> list[dict]:
        return [t.spec() for t in self.tools.values()]

    def __bool__(self) -> bool:
        return bool(self.tools)

    def run(self, name: str, arguments: dict) -> str:
        tool = self.tools.get(name)
        if tool is None or tool.fn is None:
            return f"error: no tool named {name!r}"
        problems = argument_problems(tool.parameters, arguments)
        if problems:
            return "error: " + "; ".join(problems)
        box: dict = {}
        deadline = time.monotonic() + self.timeout_s

        def work():
            try:
                box["out"] = str(tool.fn(arguments, deadline))
            except GptlabError as e:
                box["out"] = f"error: {e}"
            except Exception as e:   # a tool's bug is the model's error message, not the server's crash
                box["out"] = f"error: {type(e).__name__}: {e}"
        # A daemon thread: a tool that overruns is abandoned (the built-in ones also watch the deadline).
        t = threading.Thread(target=work, name=f"gptlab-tool-{name}", daemon=True)
        t.start()
        t.join(self.timeout_s)
        if "out" not in box:
            return f"error: {name} took longer than {self.timeout_s:g} s"
        out = box["out"]
        return out if len(out) <= self.max_chars else out[: self.max_chars - 3] + "..."


BUILTIN = ("calculator", "search")


def builtin_toolbox(names: str | list[str] | None, index: str | None = None, timeout_s: float = 5.0,
                    max_chars: int = 1000) -> ToolBox:
    """``--tools calculator,search --index INDEX`` as a ToolBox; GptlabError naming the flag if wrong."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    tools: dict[str, Tool] = {}
    for n in names or []:
        if n == "calculator":
            from gptlab.tools.calculator import calculator_tool
            tools[n] = calculator_tool()
        elif n == "search":
            if not index:
                raise GptlabError("--tools search needs --index INDEX (build one with `gptlab index DOCS --out INDEX`)")
            from gptlab.tools.search import search_tool
            tools[n] = search_tool(index)
        else:
            raise GptlabError(f"--tools: unknown tool {n!r} (choose from {', '.join(BUILTIN)})")
    if index and "search" not in tools:
        raise GptlabError("--index is only used by the search tool; add --tools search")
    return ToolBox(tools, timeout_s, max_chars)


def add_tool_args(p) -> None:
    """The flags ``chat`` and ``serve`` share."""
    p.add_argument("--tools", default=None, help="comma-separated built-in tools the model may call: "
                   + ", ".join(BUILTIN) + " (off by default)")
    p.add_argument("--index", default=None, help="search index for --tools search (from `gptlab index`)")
    p.add_argument("--max-tool-calls", type=int, default=4, help="tool calls allowed per assistant turn")
