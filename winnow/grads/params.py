"""Which parameters the engine differentiates: ``select_parameters`` over a model, and
``parse_params`` for the recipe's comma-separated spelling of a selection."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

__all__ = ["SELECTIONS", "aliases", "parse_params", "select_parameters"]

SELECTIONS = ("all", "last_layer", "lora")


def aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has (a tied parameter has several), canonical name first."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def _last_layer_ids(model: nn.Module) -> set[int]:
    mods = list(model.named_modules())
    lists = [(i, name, m) for i, (name, m) in enumerate(mods) if isinstance(m, nn.ModuleList) and len(m) >= 2]
    if lists:
        i, lname, blocks = max(lists, key=lambda x: (len(x[2]), x[0]))
        chosen = list(blocks[-1].modules())
        inside = lname + "."
        chosen += [m for name, m in mods[i + 1 :] if not name.startswith(inside)]
        return {id(p) for m in chosen for p in m.parameters(recurse=False)}
    for _, m in reversed(mods):
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if own:
            return {id(p) for p in own}
    return set()


def _entry_matches(entry: str, name: str) -> bool:
    module = name.rpartition(".")[0]
    return (
        name == entry
        or name.startswith(entry + ".")
        or module == entry
        or fnmatchcase(name, entry)
        or fnmatchcase(module, entry)
    )


def select_parameters(model: nn.Module, params: str | Sequence[str] = "all") -> dict[str, nn.Parameter]:
    """The trainable parameters ``params`` names, as ``{canonical name: parameter}`` in model order.

    ``params``:

    * ``"all"``: every parameter;
    * ``"last_layer"``: the last block of the model's longest ``nn.ModuleList`` of at least two modules
      (its transformer blocks; on a tie the later list) plus every module registered after that list (final
      norm, output layer, pooler, classifier); a model without such a list selects the parameters of its
      last module that has any (e.g. a CNN's final ``nn.Linear``). A tied output layer selects the shared
      tensor, whose gradient includes its use as the input embedding;
    * ``"lora"``: parameters whose name contains ``lora_``;
    * a list of entries, each an exact parameter name, a prefix ending at a dot (``"transformer.h.1"``),
      a module name, or an ``fnmatch`` glob over parameter or module names (``"*.attn.*"``).

    Frozen parameters (``requires_grad=False``) are skipped. A tied parameter appears once, under its
    first name in ``model.named_parameters()``, and is matched by any of its names. Raises
    ``ValueError`` for an unknown selection, a list entry that matches no parameter, or an empty result.
    """
    names = aliases(model)
    ordered = list(model.named_parameters())
    if isinstance(params, str):
        if params == "all":
            ids = {id(p) for _, p in ordered}
        elif params == "lora":
            ids = {id(p) for _, p in ordered if any("lora_" in a for a in names[id(p)])}
            if not ids:
                raise ValueError("params='lora': the model has no parameter whose name contains 'lora_'")
        elif params == "last_layer":
            ids = _last_layer_ids(model)
        else:
            raise ValueError(
                f"params must be one of {', '.join(map(repr, SELECTIONS))} or a list of parameter names, "
                f"prefixes or globs; got {params!r}"
            )
    else:
        if not isinstance(params, Sequence) or not all(isinstance(e, str) and e for e in params):
            raise ValueError(f"params must be a string or a list of non-empty strings; got {params!r}")
        ids = set()
        for entry in params:
            hit = {id(p) for _, p in ordered if any(_entry_matches(entry, a) for a in names[id(p)])}
            if not hit:
                raise ValueError(f"params entry {entry!r} matches no parameter of {type(model).__name__}")
            ids |= hit
    out = {name: p for name, p in ordered if id(p) in ids and p.requires_grad}
    if not out:
        raise ValueError(f"params={params!r} selects no trainable parameter of {type(model).__name__}")
    return out


def parse_params(spec: str) -> str | list[str]:
    """`all` / `last_layer` / `lora`, or a comma-separated list of names, prefixes or globs (a ``parameters``
    string of the recipe or of the GraNd scorer) as the ``params`` that :func:`select_parameters` takes."""
    spec = spec.strip()
    if spec in SELECTIONS:
        return spec
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(
            "scorer 'grand': parameter 'parameters' is empty; use all, last_layer, lora or names"
        )
    return parts
