"""YAML text to plain data, with the line of every key: the reader behind config.yaml.

PyYAML accepts things a config must not: duplicate keys (the last silently wins), keys that
are not text, arbitrary tags, and alias expansion without bound ("billion laughs"). This
reader composes the document into nodes (libyaml's loader when PyYAML has it: about 6x
faster, the same nodes and marks), refuses each of those with a `Problem` naming the line,
and records the line of every key path so that later validation errors can point at the
exact line too.

Nesting is limited to MAX_DEPTH levels of mappings and lists. PyYAML's composer (C or
Python) recurses once per level, so `[[[[...` 800 deep would end in a RecursionError: the
parser's events (produced iteratively) are scanned first, and nothing deeper is composed.
Building the data counts levels again, since aliases can stack one nested value into
another. Integers too long for Python to convert are refused too.

Pure: text in, data and problems out. Used by orchestrator.desired.config.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.events import CollectionEndEvent, CollectionStartEvent, NodeEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..errors import Problem
from .common import MAX_DEPTH, Loc, dotted

MAX_NODES = 100_000  # alias expansion beyond this is refused ("billion laughs")
TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels of mappings and lists: flatten it"
PYTHON_RETRY_CHARS = 64 << 10  # a syntax error in a file up to this size is explained by the Python loader

# libyaml's loader when PyYAML was built with it (~6x faster; the same nodes and marks).
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlReader:
    """YAML text -> plain data, recording the line of every key path and refusing what PyYAML
    would accept silently (duplicate keys, non-text keys, unknown tags)."""

    SCALARS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null"))

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []
        self.lines: dict[Loc, int] = {}
        self.loader: Any = None
        self.active: set[int] = set()
        self.count = 0

    def read(self, text: str, loader: Any = _LOADER) -> dict[str, Any] | None:
        """The top-level mapping, or None (with a problem) when there is none to validate."""
        refused = _prescan(text, loader)
        if refused is not None:
            self.problems.append(Problem(refused[1], file=self.file, line=refused[0]))
            return None
        try:
            self.loader = loader(text)
            root = self.loader.get_single_node()
            if root is None:
                self._problem("the file is empty: a config needs at least 'version: 1'", None)
                return None
            if not isinstance(root, MappingNode):
                self._problem(
                    f"the document must be a mapping of keys (version, capsules, ...), not {_kind(root)}", root
                )
                return None
            data = self._build(root, (), 1)
        except yaml.YAMLError as error:
            if loader is not yaml.SafeLoader and len(text) <= PYTHON_RETRY_CHARS:
                # explain syntax errors with the Python loader's clearer words (~10x slower)
                self._reset()
                return self.read(text, yaml.SafeLoader)
            if isinstance(error, yaml.MarkedYAMLError):
                self._syntax_problem(error)
                return None
            position = getattr(error, "position", None)  # ReaderError: a character YAML does not allow
            line = text[:position].count("\n") + 1 if isinstance(position, int) else None
            reason = getattr(error, "reason", "") or str(error)
            self.problems.append(Problem(f"not valid YAML: {reason}", file=self.file, line=line))
            return None
        except _TooLarge:
            self._problem(f"too many values (more than {MAX_NODES} after expanding aliases)", None)
            return None
        except _TooDeep as deep_node:
            message = f"nested deeper than {MAX_DEPTH} levels of mappings and lists (aliases included): flatten it"
            loc = deep_node.loc if len(deep_node.loc) <= 8 else (*deep_node.loc[:8], "...")
            self._problem(message, deep_node.node, loc)
            return None
        except RecursionError:  # the scan above should make this unreachable
            self._problem(f"nested too deeply to read (at most {MAX_DEPTH} levels)", None)
            return None
        finally:
            if self.loader is not None:
                self.loader.dispose()
        return data if isinstance(data, dict) else None

    def _reset(self) -> None:
        self.problems.clear()
        self.lines.clear()
        self.active.clear()
        self.count = 0
        if self.loader is not None:
            self.loader.dispose()
            self.loader = None

    def _syntax_problem(self, error: yaml.MarkedYAMLError) -> None:
        mark = error.problem_mark or error.context_mark
        message = f"not valid YAML: {error.problem or error.context or error}"
        if "'\\t'" in message:
            message += "; indent with spaces, not tabs"
        if error.context and error.problem and error.context_mark and mark is not error.context_mark:
            message += f" ({error.context} at line {error.context_mark.line + 1})"
        self.problems.append(Problem(message, file=self.file, line=mark.line + 1 if mark else None))

    def _problem(self, message: str, node: Node | None, loc: Loc = ()) -> None:
        line = node.start_mark.line + 1 if node is not None else None
        self.problems.append(Problem(message, file=self.file, line=line, field=dotted(loc)))

    def _build(self, node: Node, loc: Loc, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooLarge
        if depth > MAX_DEPTH and not isinstance(node, ScalarNode):
            raise _TooDeep(node, loc)
        if id(node) in self.active:
            self._problem("an alias refers to a value that contains it", node, loc)
            return None
        if isinstance(node, ScalarNode):
            return self._scalar(node, loc)
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode) and node.tag == "tag:yaml.org,2002:seq":
                items = []
                for i, item in enumerate(node.value):
                    self.lines[(*loc, i)] = item.start_mark.line + 1
                    items.append(self._build(item, (*loc, i), depth + 1))
                return items
            if isinstance(node, MappingNode) and node.tag == "tag:yaml.org,2002:map":
                return self._mapping(node, loc, depth)
            self._problem(f"unsupported YAML tag {node.tag!r}: write a plain mapping or list", node, loc)
            return None
        finally:
            self.active.discard(id(node))

    def _scalar(self, node: ScalarNode, loc: Loc) -> Any:
        if node.tag == "tag:yaml.org,2002:timestamp":
            return node.value  # dates stay text: capsule config values are strings, numbers, bools, JSON
        if node.tag not in self.SCALARS:
            self._problem(f"unsupported YAML tag {node.tag!r}: write a plain value", node, loc)
            return None
        assert self.loader is not None
        try:
            return self.loader.construct_object(node, deep=True)
        except ValueError:  # an integer past sys.get_int_max_str_digits()
            self._problem(f"a number of {len(node.value)} characters is too long: quote it to make it text", node, loc)
            return None

    def _mapping(self, node: MappingNode, loc: Loc, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        merges = [v for k, v in node.value if k.tag == "tag:yaml.org,2002:merge"]
        for merge in merges:  # '<<: *anchor' or '<<: [*a, *b]' (earlier ones win)
            sources = merge.value if isinstance(merge, SequenceNode) else [merge]
            for source in reversed(sources):
                if not isinstance(source, MappingNode):
                    self._problem("'<<' merges a mapping or a list of mappings", source, loc)
                    continue
                merged = self._build(source, loc, depth)
                if isinstance(merged, dict):
                    result.update(merged)
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, ScalarNode):
                self._problem(f"keys must be text, not {_kind(key_node)}", key_node, loc)
                continue
            if key_node.tag != "tag:yaml.org,2002:str":
                self._problem(f"keys must be text, not {key_node.value!r}: quote it", key_node, (*loc, key_node.value))
                continue
            key = str(key_node.value)
            if key in first_line:
                self._problem(
                    f"duplicate key {key!r} (first at line {first_line[key]}): keep only one",
                    key_node,
                    (*loc, key),
                )
            first_line.setdefault(key, line)
            self.lines[(*loc, key)] = line
            result[key] = self._build(value_node, (*loc, key), depth + 1)
        return result


class _TooLarge(Exception):
    pass


class _TooDeep(Exception):
    def __init__(self, node: Node, loc: Loc) -> None:
        super().__init__()
        self.node = node
        self.loc = loc


def _prescan(text: str, loader: Any) -> tuple[int, str] | None:
    """(line, message) when mappings and lists nest deeper than MAX_DEPTH, or when there are
    more than MAX_NODES values before any alias is expanded; from the parser's events (the
    parser is iterative; composing recurses, and costs ~10x more per value). None when
    neither, or when the text is not YAML (composing reports that)."""
    try:
        parser = loader(text)
    except yaml.YAMLError:  # the Python reader checks every character up front
        return None
    depth = count = 0
    try:
        while (event := parser.get_event()) is not None:
            if isinstance(event, NodeEvent):
                count += 1
                if count > MAX_NODES:
                    return _line(event), f"too many values (more than {MAX_NODES})"
            if isinstance(event, CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    return _line(event), TOO_DEEP
            elif isinstance(event, CollectionEndEvent):
                depth -= 1
    except yaml.MarkedYAMLError as error:
        if "nesting depth" in str(error.problem) and error.problem_mark is not None:  # libyaml's own cap (1000)
            return error.problem_mark.line + 1, TOO_DEEP
        return None
    except yaml.YAMLError:
        return None
    finally:
        parser.dispose()
    return None


def _line(event: Any) -> int:
    return int(event.start_mark.line) + 1 if event.start_mark is not None else 0


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    return "a list" if isinstance(node, SequenceNode) else f"the value {node.value!r}"
