"""Safe YAML loading that remembers where every value came from.

Only plain YAML is accepted: no tags (``!!python/object`` and friends, even ``!!int``), no
anchors or aliases (which is also the defence against alias bombs), no duplicate keys.
Mappings and lists come back as `YMap` / `YList`, which carry the `Loc` of each item so every
later error can name FILE:LINE:COL. Nothing is ever constructed from a tag, so loading never
runs code.
"""
from __future__ import annotations

import os

import yaml

from ..errors import LmcError, Loc

MAX_BYTES = 1 << 20
_YAML_TAG = "tag:yaml.org,2002:"
_SAFE_TAGS = {f"tag:yaml.org,2002:{t}" for t in
              ("str", "int", "float", "bool", "null", "seq", "map")}


class YMap(dict):
    """A mapping with `loc` (of the mapping), `key_locs` and `val_locs` (per key)."""
    loc: Loc

    def val_loc(self, key) -> Loc:
        return self.val_locs.get(key, self.loc)

    def key_loc(self, key) -> Loc:
        return self.key_locs.get(key, self.loc)


class YList(list):
    """A list with `loc` and `locs` (per item)."""
    loc: Loc


class YStr(str):
    """A string scalar with its `loc`; `quoted` says whether the source used quotes (so an
    expression's columns can be mapped back to the file)."""
    loc: Loc
    quoted: bool


def yaml_kind(v) -> str:
    """What a YAML value is, in the file's terms (for "expected X, got ...")."""
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    if v is None:
        return "nothing (null)"
    if isinstance(v, bool):
        return f"the bool {str(v).lower()}"
    if isinstance(v, str):
        return f"the string {str(v)!r}"
    return f"{type(v).__name__} {v!r}"


def _loc(path: str, mark) -> Loc:
    return Loc(path, mark.line + 1, mark.column + 1)


def load_yaml(path: str):
    """Parse `path` into YMap/YList/scalars, or raise LmcError at the offending place."""
    if not os.path.exists(path):
        raise LmcError("no such file", Loc(path, 1, 1))
    if os.path.isdir(path):
        raise LmcError("is a directory, expected a YAML file", Loc(path, 1, 1))
    size = os.path.getsize(path)
    if size > MAX_BYTES:
        raise LmcError(f"file is {size} bytes; model files are limited to {MAX_BYTES}",
                       Loc(path, 1, 1))
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmcError(f"not UTF-8 text ({e.reason} at byte {e.start})", Loc(path, 1, 1)) from None
    return loads(text, path)


def loads(text: str, path: str = "<string>"):
    if not text.strip() or all(ln.strip().startswith("#") or not ln.strip()
                                for ln in text.splitlines()):
        raise LmcError("empty file: expected a model description", Loc(path, 1, 1))
    try:
        # First pass over events: refuse aliases/anchors and tags before anything is built.
        for ev in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(ev, yaml.AliasEvent):
                raise LmcError("YAML aliases (*name) are not allowed in model files",
                               _loc(path, ev.start_mark))
            anchor = getattr(ev, "anchor", None)
            if anchor is not None:
                raise LmcError(f"YAML anchors (&{anchor}) are not allowed in model files",
                               _loc(path, ev.start_mark))
            tag = getattr(ev, "tag", None)
            if tag is not None:  # any explicit tag, even !!int: plain YAML only (docs/yaml.md)
                shown = "!!" + tag[len(_YAML_TAG):] if tag.startswith(_YAML_TAG) else tag
                raise LmcError(f"YAML tag {shown} is not allowed in model files (write the "
                               f"plain value)", _loc(path, ev.start_mark))
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        msg = f"YAML syntax error: {e.problem or e.context}"
        raise LmcError(msg, _loc(path, mark) if mark else Loc(path, 1, 1)) from None
    except yaml.YAMLError as e:
        raise LmcError(f"YAML error: {e}", Loc(path, 1, 1)) from None
    if node is None:
        raise LmcError("empty file: expected a model description", Loc(path, 1, 1))
    return _convert(node, path, yaml.SafeLoader(""))


def _convert(node, path, constructor):
    loc = _loc(path, node.start_mark)
    if node.tag not in _SAFE_TAGS:
        raise LmcError(f"YAML tag {node.tag} is not allowed in model files", loc)
    if isinstance(node, yaml.MappingNode):
        out = YMap()
        out.loc, out.key_locs, out.val_locs = loc, {}, {}
        for k, v in node.value:
            key = _convert(k, path, constructor)
            kl = _loc(path, k.start_mark)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise LmcError("mapping keys must be plain scalars", kl)
            if key in out:
                raise LmcError(f"duplicate key {key!r} (first at line "
                               f"{out.key_locs[key].line})", kl)
            out[key] = _convert(v, path, constructor)
            out.key_locs[key], out.val_locs[key] = kl, _loc(path, v.start_mark)
        return out
    if isinstance(node, yaml.SequenceNode):
        out = YList()
        out.loc, out.locs = loc, []
        for v in node.value:
            out.append(_convert(v, path, constructor))
            out.locs.append(_loc(path, v.start_mark))
        return out
    value = constructor.construct_object(node, deep=True)
    if isinstance(value, str):
        s = YStr(value)
        s.loc, s.quoted = loc, node.style in ("'", '"')
        return s
    return value
