"""YAML for configs and settings: plain values only, bounded in size, duplicate keys refused.

``yaml.safe_load`` already never builds Python objects, but it accepts three things that hurt here:

- duplicate keys: ``lr: 0.1`` and, further down, ``lr: 0.01`` silently keep the last one;
- aliases that multiply: ``a: &a [x, x]``, ``b: &b [*a, *a]``, ... is a few hundred bytes that
  stands for 2^n values once anything walks it (a run's fingerprint does); we count the nodes of
  the document as if every alias were written out, and refuse it past :data:`MAX_NODES`;
- any size: a document larger than :data:`MAX_BYTES` is refused before it is parsed.

The values returned share nothing: a value reached through an alias is a copy, so changing one
place (a ``--set`` override) never changes another.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_BYTES = 1 << 20
MAX_NODES = 10_000
MAX_DEPTH = 64
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlError(ValueError):
    """A YAML document that cannot be used; the message names the source and the line."""

    def __init__(self, source: str, line: int | None, problem: str) -> None:
        where = f"{source}, line {line}" if line is not None else source
        super().__init__(f"{where}: {problem}")
        self.source, self.line, self.problem = source, line, problem

    def __reduce__(self) -> tuple:
        return type(self), (self.source, self.line, self.problem)


def load_yaml(text: str, source: str = "<yaml>") -> Any:
    """The single YAML document in ``text`` as plain values (dict, list, str, int, float, bool, None, dates).

    ``source`` (a file name, ``--set key``) names the origin in errors. Raises :class:`YamlError`
    for invalid YAML, a duplicate key, python tags, more than :data:`MAX_BYTES` bytes, or more than
    :data:`MAX_NODES` values after expanding aliases (or nesting deeper than :data:`MAX_DEPTH`).
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise YamlError(source, None, f"the document is {size:,} bytes, more than the {MAX_BYTES:,} allowed")
    loader = _StrictLoader(text)
    loader.name = source  # what the loader's own errors and marks call the document
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_expanded(node, source)
        return _unshared(loader.construct_document(node))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = " ".join(part for part in (err.context, err.problem) if part) or str(err)
        raise YamlError(source, mark.line + 1 if mark else None, f"not valid YAML: {problem}") from None
    except yaml.YAMLError as err:
        raise YamlError(source, None, f"not valid YAML: {err}") from None
    finally:
        loader.dispose()


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (merge keys ``<<`` aside) and
    nesting deeper than MAX_DEPTH (before its recursive composer could run out of stack)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlError(self.name, self.peek_event().start_mark.line + 1,
                                f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first_line.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            line = key_node.start_mark.line + 1
            if seen is not None:
                raise YamlError(self.name, line, f"duplicate key {key!r} (first given on line {seen}); "
                                                 "give each key once")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _count_expanded(root: yaml.Node, source: str) -> None:
    """Refuse ``root`` if writing out its aliases would give more than MAX_NODES nodes, nesting
    deeper than MAX_DEPTH, or a cycle.

    size(node) = 1 + the sum of its children's sizes and height(node) = 1 + their largest height,
    a shared (aliased) node counting at every place it appears; each distinct node is measured
    once, so a bomb is refused in time linear in the document.
    """
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (size, height)
    in_progress: set[int] = set()

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        line = node.start_mark.line + 1
        if id(node) in in_progress:
            raise YamlError(source, line, "an alias refers to a value that contains it")
        if id(node) not in measured:
            in_progress.add(id(node))
            children: list[yaml.Node] = []
            if isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            elif isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            size, height = 1, 1
            for child in children:
                child_size, child_height = measure(child, depth + 1)
                size, height = size + child_size, max(height, child_height + 1)
                if size > MAX_NODES:
                    raise YamlError(source, line, f"more than {MAX_NODES:,} values once its aliases (*name) are "
                                                  "expanded: an alias bomb, or far larger than any config")
            in_progress.discard(id(node))
            measured[id(node)] = (size, height)
        size, height = measured[id(node)]
        if depth + height > MAX_DEPTH:
            raise YamlError(source, line, f"nested more than {MAX_DEPTH} levels deep once its aliases are expanded")
        return size, height

    measure(root, 0)


def _unshared(value: Any) -> Any:
    """``value`` with every dict and list copied, so no two places share one (aliases give shared ones)."""
    if isinstance(value, dict):
        return {key: _unshared(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unshared(item) for item in value]
    return value
