"""How sweep values files stack: ``-f base.yaml -f overlay.yaml``, merged the way Helm merges them.

Why keyed sections: Helm merges maps key by key but replaces a list whole, so while ``sweep.runs``,
``sweep.grid.compositions`` and ``sweep.grid.axes`` were lists, an overlay had to restate every run,
composition or axis to change one of them. They are maps now, keyed by name (axes by their config path), as
KubeRay's own chart keys its worker groups: an overlay changes or adds one entry, and ``NAME: null`` deletes
one (Helm drops a map key an overlay sets to null; the chart skips a null entry no chart default held).

A file still in the list format is refused in one line naming ``mzsane sweep convert``, which prints it keyed.
It converts a stack, not just a file: an overlay's list used to *replace* the lists below it, so its keyed form
also deletes (``NAME: null``) the entries of the files below that its list left out, and the stack renders the
same points as before.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import yaml

from mzsane.errors import ConfigError

# The keyed sections: where they live in the values, and an example entry for messages.
KEYED = {
    ("sweep", "runs"): "runs: {NAME: {zooSize: 100, zoos: [mnist-cnn_s], set: {PATH: VALUE}}}",
    ("sweep", "grid", "compositions"): "compositions: {NAME: {zoos: [mnist-cnn_s]}}",
    ("sweep", "grid", "axes"): "axes: {PATH: {values: [A, B]}}",
}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base`` as ``helm install -f base -f extra`` merges them: maps merge key by key, lists and
    scalars replace, ``null`` is kept (Helm then drops the key, deleting a keyed entry)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _get(values: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = values
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def refuse_lists(values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` unchanged, or a one-line error when a keyed section of it is a list (the old format).
    ``source``: the values file's path, or ``--set 'EXPRESSION'``."""
    for path, example in KEYED.items():
        if not isinstance(_get(values, path), list):
            continue
        key = ".".join(path)
        if source.startswith("--set "):
            where, fix = source, f"set one entry instead, e.g. --set {key}.NAME.FIELD=VALUE"
        else:
            where, fix = f"values file '{source}'", (f"print it keyed with `mzsane sweep convert -f {source}` "
                                                     "(after the -f files it is stacked on, if any)")
        raise ConfigError(f"{where}: {key} is a list, the format before entries were keyed by name so that "
                          f"overlays merge; key it ({example}): {fix}")
    return values


# ------------------------------------------------------------------------------------------ converting


def _keyed_entries(path: tuple[str, ...], items: list[Any], source: str) -> dict[str, dict[str, Any]]:
    """One list section as name -> entry, in list order."""
    out: dict[str, dict[str, Any]] = {}
    where = ".".join(path)
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: {where}[{i}] is not a mapping; fix it before converting")
        entry = dict(item)
        if path[-1] == "axes":
            key = entry.pop("path", None)
        elif path[-1] == "compositions":  # a nameless composition was labelled by its zoos joined with "+"
            key = entry.pop("name", None) or "+".join(map(str, entry.get("zoos") or []))
        else:
            key = entry.pop("name", None)
        if not key:
            raise ConfigError(f"{source}: {where}[{i}] has no {'path' if path[-1] == 'axes' else 'name'}; "
                              "give it one before converting")
        if key in out:
            raise ConfigError(f"{source}: {where} names '{key}' twice; drop one before converting")
        out[str(key)] = entry
    return out


def _ordered_axes(axes: dict[str, dict[str, Any]], below: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The chart crosses axes in (order, path) order and joins their values into point names in that order; a
    list's order is kept with explicit ``order`` fields only where sorting by path would change it."""
    inherited = any(isinstance(below.get(p), dict) and "order" in below[p] for p in axes)
    if list(axes) == sorted(axes) and not inherited:
        return axes
    return {p: {**entry, "order": i} for i, (p, entry) in enumerate(axes.items())}


def convert(sources: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each file's values with its keyed lists as maps, converted so that the stack merges to what the lists gave:
    an entry of the files below that a file's list left out is deleted there (``NAME: null``), an empty list
    becomes ``null`` (no entries). Files already keyed pass through unchanged."""
    below: dict[str, Any] = {}
    out = []
    for source, values in sources:
        values = copy.deepcopy(values)
        for path in KEYED:
            items = _get(values, path)
            if not isinstance(items, list):
                continue
            earlier = _get(below, path)
            earlier = earlier if isinstance(earlier, dict) else {}
            keyed: dict[str, Any] | None = _keyed_entries(path, items, source) if items else None
            if keyed is not None:
                if path[-1] == "axes":
                    keyed = _ordered_axes(keyed, earlier)
                keyed.update({name: None for name in earlier if name not in keyed})
            parent = _get(values, path[:-1])
            parent[path[-1]] = keyed
        out.append(values)
        below = merge(below, values)
    return out


def dumps(sources: list[str], converted: list[dict[str, Any]]) -> str:
    """The converted files as YAML documents, each headed by the file it came from (comments are not kept)."""
    return "".join(f"{'---' + chr(10) if i else ''}# {source}, keyed (mzsane sweep convert)\n"
                   + yaml.safe_dump(values, sort_keys=False, default_flow_style=None, width=120)
                   for i, (source, values) in enumerate(zip(sources, converted)))


def convert_cli(args: argparse.Namespace) -> None:
    from mzsane.sweep.chart import read_values_file  # chart merges through this module

    if not args.values:
        raise ConfigError("sweep convert needs the values files to convert: -f jobs/X.yaml [-f overlay.yaml ...]")
    sys.stdout.write(dumps(args.values, convert([(path, read_values_file(path)) for path in args.values])))
