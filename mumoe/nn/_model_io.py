"""Whole converted models: :func:`save_model` and :func:`load_model`, beside the base's own files.

A converted model is a base model (from ``transformers``, ``timm`` or plain
torch) whose modules :func:`~mumoe.nn.replace_linear`,
:func:`~mumoe.nn.replace_mlp` or the user replaced by μMoE layers and blocks.
:func:`save_model` writes, into a folder, ``mumoe.json`` (the manifest: which
modules were replaced, by what, with what constructor settings, and what they
replaced) and ``mumoe.safetensors`` (their parameters and buffers; with
``base=True`` the rest of the model's state too).  :func:`load_model` rebuilds
the same replacements on a freshly built base model, all or nothing.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from mumoe.inference import write_atomically
from mumoe.nn._block import MuMoEBlock
from mumoe.nn._config import config_error, config_field
from mumoe.nn._convert import _parent, replaced_record
from mumoe.nn._hub import check_state, load_checked, read_state, write_state
from mumoe.nn._layers import MuMoE
from mumoe.nn._mlp import FoldedIntoBlock
from mumoe.nn._preset_layers import LAYER_CLASSES
from mumoe.typing import PathLike

__all__ = [
    "MANIFEST_NAME",
    "MODEL_FORMAT",
    "MODEL_VERSION",
    "MODULE_CLASSES",
    "WEIGHTS_NAME",
    "load_model",
    "module_from_config",
    "save_model",
]

#: The manifest's ``format`` and the version this mumoe writes and reads.
MODEL_FORMAT = "mumoe-model"
MODEL_VERSION = 1
#: The files save_model writes (beside a ``save_pretrained`` folder's own).
MANIFEST_NAME = "mumoe.json"
WEIGHTS_NAME = "mumoe.safetensors"

_REPLACEMENTS = (MuMoE, MuMoEBlock, FoldedIntoBlock)

#: The classes a configuration may name, by name.
MODULE_CLASSES: dict[str, type[MuMoE] | type[MuMoEBlock]] = {
    **LAYER_CLASSES,
    "MuMoEBlock": MuMoEBlock,
}


def _version() -> str:
    try:
        return importlib.metadata.version("mumoe")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def module_from_config(
    config: Mapping[str, Any],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    where: str = "",
) -> MuMoE | MuMoEBlock:
    """A freshly initialised layer or block of the class ``config`` names.

    Parameters
    ----------
    config : mapping
        As a layer's or block's ``get_config()`` gives it.
    device : torch.device or str, optional
    dtype : torch.dtype, optional
        Of the parameters; by default the configuration's.
    where : str, optional
        Named in messages.

    Returns
    -------
    MuMoE or MuMoEBlock
        Built by that class's ``from_config``.

    Raises
    ------
    ValueError
        For a class not in :data:`MODULE_CLASSES`, or a configuration its
        ``from_config`` refuses.

    Examples
    --------
    >>> from mumoe.nn import MuMoEBlock
    >>> block = MuMoEBlock(8, 32, expert_dims=4, rank=3)
    >>> type(module_from_config(block.get_config())).__name__
    'MuMoEBlock'
    """
    where = where or "of a μMoE module"
    if not isinstance(config, Mapping):
        raise config_error(where, f"is {type(config).__name__}, expected a JSON object")
    name = config_field(config, "class", str, where)
    cls = MODULE_CLASSES.get(name)
    if cls is None:
        raise config_error(where, f"class {name!r} is not one of {list(MODULE_CLASSES)}")
    return cls.from_config(config, device=device, dtype=dtype, where=where)


def _class_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _replacements(model: nn.Module) -> Iterator[tuple[list[str], nn.Module]]:
    """Each outermost μMoE module of ``model`` with every name it is registered under."""
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(f"{outer}.") for outer in inside):
            continue
        if isinstance(module, _REPLACEMENTS):
            inside.append(name)
            names.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    for key, module in modules.items():
        yield names[key], module


def save_model(model: nn.Module, folder: PathLike, *, base: bool = False) -> None:
    """Write the μMoE replacements of a converted model to ``folder``.

    Every outermost :class:`~mumoe.nn.MuMoE`, :class:`~mumoe.nn.MuMoEBlock`
    and :class:`~mumoe.nn.FoldedIntoBlock` of ``model`` is recorded in
    ``mumoe.json`` under every name it is registered by (a shared module once),
    with its constructor settings and what it replaced, and its state goes to
    ``mumoe.safetensors``.  The rest of the model is the base's: save it as
    its library does (``model.save_pretrained(folder)`` for ``transformers``,
    the same folder is fine), or pass ``base=True`` to keep it here too.

    Parameters
    ----------
    model : torch.nn.Module
        The converted model (not a μMoE layer itself: use its
        ``save_pretrained`` or :func:`mumoe.nn.save`).
    folder : str or path-like
        Created if missing; ``mumoe.json`` and ``mumoe.safetensors`` are
        replaced, atomically, and nothing else is touched.
    base : bool, default False
        Also write every other parameter and persistent buffer of ``model``
        (tied parameters once), for base models whose weights are not saved
        elsewhere.

    Raises
    ------
    TypeError
        If ``model`` is itself a μMoE layer or block, or holds a μMoE module
        a configuration cannot describe (:class:`mumoe.nn.FactorizedMuMoE`).
    ValueError
        If ``model`` holds no μMoE module, or one's gate uses a custom
        activation callable.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from mumoe.nn import replace_linear
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    >>> _ = replace_linear(model, include="0", network="mxd", expert_dims=8)
    >>> folder = tempfile.mkdtemp()
    >>> save_model(model, folder, base=True)
    >>> sorted(os.listdir(folder))
    ['mumoe.json', 'mumoe.safetensors']
    """
    if isinstance(model, _REPLACEMENTS):
        raise TypeError(
            f"model is itself a {type(model).__name__}; save_model saves the μMoE modules of a "
            "converted model: save one layer or block with its save_pretrained or mumoe.nn.save"
        )
    found = list(_replacements(model))
    if not found:
        raise ValueError(
            f"{type(model).__name__} holds no μMoE layer or block to save (convert it with "
            "mumoe.nn.replace_linear or replace_mlp first)"
        )
    entries, tensors = [], {}
    for names, module in found:
        config: dict[str, Any]
        if isinstance(module, FoldedIntoBlock):
            config = {"class": "FoldedIntoBlock"}
        else:
            assert isinstance(module, MuMoE | MuMoEBlock)
            try:
                config = module.get_config()
            except (TypeError, ValueError) as error:
                raise type(error)(f"{names[0]!r} cannot be saved: {error}") from error
        entries.append(
            {
                "names": names,
                "config": config,
                "converted_from": getattr(module, "converted_from", None),
            }
        )
        for key, value in module.state_dict().items():
            tensors[f"{names[0]}.{key}"] = value
    tied: dict[str, str] = {}
    if base:
        replaced = tuple(f"{name}." for names, _ in found for name in names)
        first_of: dict[tuple[Any, ...], str] = {}
        for key, value in model.state_dict(keep_vars=True).items():
            if key.startswith(replaced):
                continue
            identity = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
            if value.numel() and identity in first_of:
                tied[key] = first_of[identity]
                continue
            first_of[identity] = key
            tensors[key] = value.detach()
    manifest = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "mumoe_version": _version(),
        "model_class": _class_name(model),
        "modules": entries,
        "base": base,
        "tied": tied,
        "entries": {name: list(value.shape) for name, value in sorted(tensors.items())},
    }
    os.makedirs(folder, exist_ok=True)
    write_state(os.path.join(folder, WEIGHTS_NAME), tensors, {"format": "pt"})
    text = json.dumps(manifest, indent=1).encode("utf-8")
    write_atomically(os.path.join(folder, MANIFEST_NAME), text, "the model manifest")


def _read_manifest(folder: PathLike) -> dict[str, Any]:
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"{os.fspath(folder)!r} holds no {MANIFEST_NAME}: it was not written by "
            "mumoe.nn.save_model"
        )
    try:
        with open(path, encoding="utf-8") as file:
            manifest = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path!r} is not a readable JSON manifest: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path!r} is not a mumoe model manifest (format {MODEL_FORMAT!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path!r}: version {version!r} is not a format version")
    if version > MODEL_VERSION:
        raise ValueError(
            f"{path!r} is format version {version}, written by mumoe "
            f"{manifest.get('mumoe_version')!r}; this mumoe ({_version()}) reads up to version "
            f"{MODEL_VERSION}: upgrade mumoe to load it"
        )
    expected = {
        "model_class": str,
        "modules": list,
        "base": bool,
        "tied": dict,
        "entries": dict,
    }
    for key, kind in expected.items():
        if not isinstance(manifest.get(key), kind):
            raise ValueError(
                f"{path!r}: {key!r} is {manifest.get(key)!r}, expected {kind.__name__}"
            )
    for index, entry in enumerate(manifest["modules"]):
        names = entry.get("names") if isinstance(entry, dict) else None
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n for n in names)
            or not isinstance(entry.get("config"), dict)
            or not isinstance(entry.get("converted_from"), dict | None)
        ):
            raise ValueError(
                f"{path!r}: module entry {index} is not {{'names': [...], 'config': {{...}}, "
                f"'converted_from': {{...}} or null}}: {entry!r}"
            )
    every = sorted(name for entry in manifest["modules"] for name in entry["names"])
    for name in every:
        inner = [other for other in every if other.startswith(f"{name}.")]
        if inner:
            raise ValueError(
                f"{path!r} replaces {name!r} and, inside it, {inner[0]!r}: a manifest replaces "
                "outermost modules only"
            )
    return manifest


def _module_at(model: nn.Module, name: str, folder: PathLike) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        every = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, every, n=3)
        raise ValueError(
            f"{os.fspath(folder)!r} replaces {name!r}, which {type(model).__name__} does not "
            f"have{f' (close: {close})' if close else ''}: is this the base model it was saved "
            "from?"
        ) from None


def _dtype_and_device(module: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return None, None


def load_model(model: nn.Module, folder: PathLike) -> nn.Module:
    """Put back, on a freshly built base model, the μMoE replacements :func:`save_model` wrote.

    Everything is checked before ``model`` changes: the manifest (format,
    version, fields), that ``model`` is of the class it was saved from and has
    every replaced module, each of them the class and parameter shapes the
    conversion replaced, and that the weights file holds exactly the entries
    the manifest lists, of their shapes.  Only then are the replacements put
    in, each on the device and in the floating dtype of the module it
    replaces, in that module's train/eval mode (and, with a ``base=True`` folder,
    the rest of the state copied in).  If a check fails, ``model`` is left
    exactly as it was.

    Parameters
    ----------
    model : torch.nn.Module
        The base model, as the conversion found it: for ``transformers``,
        ``AutoModelForX.from_pretrained(folder)`` of the folder the converted
        model was ``save_pretrained`` to (its replaced layers come back dense
        and at random, which the replacements overwrite).
    folder : str or path-like
        Holding ``mumoe.json`` and ``mumoe.safetensors``.

    Returns
    -------
    torch.nn.Module
        ``model`` itself, converted.

    Raises
    ------
    ValueError
        For a missing, corrupt or newer manifest, a base model of another
        class, a replaced module it lacks (the message names the closest it
        has) or that differs from what was replaced, a module already
        replaced, or weights that do not match the manifest.

    Examples
    --------
    >>> import tempfile, torch
    >>> from mumoe.nn import replace_linear
    >>> def build():
    ...     layers = torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)
    ...     return torch.nn.Sequential(*layers)
    >>> model = replace_linear(build(), include="0", network="cp", expert_dims=8, rank=4)
    >>> folder = tempfile.mkdtemp()
    >>> save_model(model, folder, base=True)
    >>> loaded = load_model(build(), folder)
    >>> x = torch.randn(3, 8)
    >>> torch.equal(loaded.eval()(x), model.eval()(x)), type(loaded[0]).__name__
    (True, 'MuMoE')
    """
    manifest = _read_manifest(folder)
    where = os.fspath(folder)
    if manifest["model_class"] != _class_name(model):
        raise ValueError(
            f"{where!r} was saved from a {manifest['model_class']}, not a {_class_name(model)}: "
            "give load_model the base model it was converted from"
        )
    replacements: list[tuple[list[str], nn.Module]] = []
    expected_entries: dict[str, list[int]] = {}
    replaced_prefixes: list[str] = []
    seen: set[str] = set()
    for entry in manifest["modules"]:
        names: list[str] = entry["names"]
        for name in names:
            if name in seen:
                raise ValueError(f"{where!r}: {name!r} is replaced twice in the manifest")
            seen.add(name)
        current = _module_at(model, names[0], folder)
        for name in names[1:]:
            if _module_at(model, name, folder) is not current:
                raise ValueError(
                    f"{where!r}: {names[0]!r} and {name!r} were one module when saved, but are "
                    "two in this model"
                )
        if isinstance(current, _REPLACEMENTS):
            raise ValueError(
                f"{names[0]!r} is already a {type(current).__name__}: load_model takes the base "
                "model, before conversion"
            )
        record = entry["converted_from"]
        if record is not None and replaced_record(current) != record:
            raise ValueError(
                f"{names[0]!r} is {replaced_record(current)} in this model, but the conversion "
                f"replaced {record}: is this the base model it was saved from?"
            )
        config = entry["config"]
        dtype, device = _dtype_and_device(current)
        module: nn.Module
        if config == {"class": "FoldedIntoBlock"}:
            module = FoldedIntoBlock(record)
        else:
            module = module_from_config(
                config, device=device, dtype=dtype, where=f"{where!r}, module {names[0]!r}"
            )
            module.converted_from = record
            if isinstance(module, MuMoE) and record is not None:
                # As replace_linear leaves it: a stand-in .weight/.bias for parents that read them.
                module._stands_in_for = " and ".join(map(repr, names))
                module._linear_bias = "bias" in record.get("parameters", {})
        module.train(current.training)
        own = {f"{names[0]}.{key}": value for key, value in module.state_dict().items()}
        expected_entries.update({key: list(value.shape) for key, value in own.items()})
        replacements.append((names, module))
        replaced_prefixes.extend(f"{name}." for name in names)
    tied: dict[str, str] = manifest["tied"]
    base_targets: dict[str, torch.Tensor] = {}
    if manifest["base"]:
        prefixes = tuple(replaced_prefixes)
        for key, value in model.state_dict(keep_vars=True).items():
            if not key.startswith(prefixes):
                base_targets[key] = value
                if key not in tied:
                    expected_entries[key] = list(value.shape)
        unknown = sorted(set(tied) - set(base_targets))
        if unknown or not all(first in base_targets for first in tied.values()):
            raise ValueError(f"{where!r}: the tied entries {tied} are not in the model's state")
    if manifest["entries"] != expected_entries:
        difference = _difference(manifest["entries"], expected_entries)
        raise ValueError(f"{where!r}: the manifest's entries do not fit this model: {difference}")
    stored = read_state(os.path.join(folder, WEIGHTS_NAME), f"{where!r}'s {WEIGHTS_NAME}")
    found = {name: list(value.shape) for name, value in stored.items()}
    if found != expected_entries:
        difference = _difference(expected_entries, found)
        raise ValueError(
            f"{where!r}: {WEIGHTS_NAME} does not hold what {MANIFEST_NAME} lists "
            f"({difference}); the two files come from different saves"
        )
    for names, module in replacements:
        prefix = f"{names[0]}."
        state = {key[len(prefix) :]: v for key, v in stored.items() if key.startswith(prefix)}
        load_checked(module, state, f"{where!r}, module {names[0]!r}")
    # A tie the fresh model does not make gets the first's value too.
    base_values = {key: stored[tied.get(key, key)] for key in base_targets}
    check_state(base_targets, base_values, f"{where!r}, base")
    with torch.no_grad():
        for key, target in base_targets.items():
            target.copy_(base_values[key])
    for names, module in replacements:
        for name in names:
            parent, child = _parent(model, name)
            setattr(parent, child, module)
    return model


def _difference(expected: dict[str, Any], found: dict[str, Any]) -> str:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        parts.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if shapes:
        k = shapes[0]
        parts.append(f"{k!r} has shape {found[k]}, expected {expected[k]}")
    return "; ".join(parts)
