"""``save_pretrained``/``from_pretrained`` for μMoE layers and blocks, in the hub's layout.

With ``huggingface_hub`` installed (the ``hub`` extra), :class:`HubMixin` is
its ``PyTorchModelHubMixin``: a folder holds ``config.json`` (the module's
settings, its ``get_config()``), ``model.safetensors`` (its
state) and a model card, and ``push_to_hub`` uploads it.  Loading is strict:
every tensor present, of its shape, before any is copied.  Without the extra,
the three methods raise an ``ImportError`` that names it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mumoe.inference import write_atomically

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "HubMixin",
    "check_state",
    "load_checked",
    "read_state",
    "write_state",
]

#: The files of a folder, as the hub names them.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_MISSING = (
    "save_pretrained, from_pretrained and push_to_hub need huggingface_hub: "
    "pip install 'mumoe[hub]' (or save one layer with mumoe.nn.save, a model with "
    "mumoe.nn.save_model)"
)


def write_state(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, str]
) -> None:
    """Write tensors to a safetensors file, atomically (:func:`mumoe.inference.write_atomically`).

    Parameters
    ----------
    path : str or path-like
    tensors : dict of str to torch.Tensor
        Copied to the CPU, contiguous; no two may share memory.
    meta : dict of str to str
        The file's string metadata.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "state.safetensors")
    >>> write_state(path, {"a": torch.ones(2)}, {"format": "pt"})
    >>> sorted(read_state(path, "test"))
    ['a']
    """
    from safetensors.torch import save

    host = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    write_atomically(path, save(host, metadata=meta), "the weights file")


def read_state(path: str | os.PathLike[str], what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU; unreadable: a ``ValueError`` naming ``what``.

    Parameters
    ----------
    path : str or path-like
    what : str
        What the file is, for messages.

    Returns
    -------
    dict of str to torch.Tensor

    Raises
    ------
    ValueError
        If the file is missing, not a regular file, or not a valid safetensors file.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "bad.safetensors")
    >>> _ = open(path, "wb").write(b"not a safetensors file")
    >>> read_state(path, "the weights")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the weights ('...bad.safetensors') is not a valid safetensors file: ...
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what} ({path!r}) is missing or not a regular file")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(f"{what} ({path!r}) is not a valid safetensors file: {error}") from error


def check_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str) -> None:
    """Check that ``state`` can be copied into the tensors ``own``: the same names and shapes.

    Parameters
    ----------
    own : dict of str to torch.Tensor
        The tensors to be written (a ``state_dict``).
    state : dict of str to torch.Tensor
        The values, exactly ``own``'s names.
    where : str
        Named in messages.

    Raises
    ------
    ValueError
        For a missing or extra entry, a shape that differs, a float value for
        an integer tensor (or the reverse), or a value a narrower dtype cannot
        hold.

    Examples
    --------
    >>> import torch
    >>> linear = torch.nn.Linear(2, 3)
    >>> check_state(linear.state_dict(), {"weight": torch.zeros(3, 2)}, "linear")
    Traceback (most recent call last):
    ...
    ValueError: linear: missing entries ['bias']
    """
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        parts = [f"missing entries {missing}"] if missing else []
        parts += [f"unexpected entries {extra}"] if extra else []
        raise ValueError(f"{where}: {'; '.join(parts)}")
    for name, value in state.items():
        target = own[name]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{where}: entry {name!r} has shape {tuple(value.shape)}, the module's is "
                f"{tuple(target.shape)}"
            )
        if value.is_floating_point() != target.is_floating_point():
            raise ValueError(
                f"{where}: entry {name!r} is {value.dtype}, the module's {target.dtype}"
            )
        if target.is_floating_point() and target.dtype != value.dtype:
            largest = torch.finfo(target.dtype).max
            finite = value[torch.isfinite(value)]
            if finite.numel() and float(finite.abs().max()) > largest:
                raise ValueError(
                    f"{where}: entry {name!r} holds values beyond {target.dtype}'s largest "
                    f"({largest:.4g}): loading it would give inf"
                )


def load_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` into ``module`` after :func:`check_state`: nothing is copied if it fails.

    Parameters
    ----------
    module : torch.nn.Module
    state : dict of str to torch.Tensor
        Exactly the module's ``state_dict`` names.
    where : str
        Named in messages.

    Raises
    ------
    ValueError
        As :func:`check_state`.

    Examples
    --------
    >>> import torch
    >>> linear = torch.nn.Linear(2, 3)
    >>> load_checked(linear, {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}, "linear")
    >>> float(linear.weight.detach().sum())
    6.0
    """
    check_state(module.state_dict(), state, where)
    module.load_state_dict(state, strict=True)


try:
    from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
except ImportError:  # the hub extra is optional

    class HubMixin:
        """Without ``huggingface_hub``: the hub methods say which extra to install."""

        def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
            """Raise ``ImportError``: needs ``pip install 'mumoe[hub]'``."""
            raise ImportError(_MISSING)

        def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
            """Raise ``ImportError``: needs ``pip install 'mumoe[hub]'``."""
            raise ImportError(_MISSING)

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
            """Raise ``ImportError``: needs ``pip install 'mumoe[hub]'``."""
            raise ImportError(_MISSING)

else:

    class HubMixin(  # type: ignore[no-redef]
        PyTorchModelHubMixin,
        library_name="mumoe",
        tags=["mumoe", "mixture-of-experts"],
        paper_url="https://arxiv.org/abs/2402.12550",
    ):
        """``PyTorchModelHubMixin`` with mumoe's configuration and a strict load."""

        def _save_pretrained(self, save_directory: Path) -> None:
            config = self.get_config()  # type: ignore[attr-defined]
            write_state(save_directory / WEIGHTS_NAME, self.state_dict(), {"format": "pt"})  # type: ignore[attr-defined]
            (save_directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))

        @classmethod
        def _from_pretrained(
            cls,
            *,
            model_id: str,
            revision: str | None,
            cache_dir: str | Path | None,
            force_download: bool,
            local_files_only: bool,
            token: str | bool | None,
            map_location: str = "cpu",
            config: dict[str, Any] | None = None,
            **model_kwargs: Any,
        ) -> Any:
            def file(name: str) -> str:
                if os.path.isdir(model_id):
                    return os.path.join(model_id, name)
                return hf_hub_download(
                    repo_id=model_id,
                    filename=name,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    token=token,
                    local_files_only=local_files_only,
                )

            if config is None:
                raise ValueError(
                    f"{model_id!r} has no {CONFIG_NAME}: it was not saved by save_pretrained"
                )
            # from_pretrained passes the config's fields that share a name with an
            # __init__ argument as keywords; the config itself is what builds, and a
            # keyword of the caller's may only choose the dtype.
            dtype = model_kwargs.pop("dtype", None)
            if isinstance(dtype, str):  # the config's own, passed back
                dtype = None
            if dtype is not None and not isinstance(dtype, torch.dtype):
                raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
            differing = sorted(
                k for k, v in model_kwargs.items() if k not in config or config[k] != v
            )
            if differing:
                raise TypeError(
                    f"from_pretrained builds the module {model_id!r} holds; it takes dtype= and "
                    f"map_location=, not {differing} (given values that differ from its config)"
                )
            where = f"{os.path.join(model_id, CONFIG_NAME)!r}"
            module = cls.from_config(config, device=map_location, dtype=dtype, where=where)  # type: ignore[attr-defined]
            state = read_state(file(WEIGHTS_NAME), f"{model_id!r}'s {WEIGHTS_NAME}")
            load_checked(module, state, f"{model_id!r}")
            return module.eval()
