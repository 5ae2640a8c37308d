"""The weights file's reader without torch: what is not a mumoe file is refused, by name.

Files written from torch modules, and the crafted ones, are read in ``tests/nn/test_io.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import safetensors.numpy

from mumoe.inference import load


def test_garbage_and_truncated_files_are_refused(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="is not a readable mumoe weights file"):
        load(path)
    safetensors.numpy.save_file({"a": np.zeros(64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="is not a readable mumoe weights file"):
        load(path)


def test_a_safetensors_file_without_a_description_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="has no 'mumoe' description in its metadata"):
        load(path)
    safetensors.numpy.save_file({"a": np.zeros(3)}, str(path), metadata={"mumoe": "{not json"})
    with pytest.raises(ValueError, match="has unreadable metadata"):
        load(path)


def test_what_is_not_a_regular_file_is_refused_before_it_is_opened(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    with pytest.raises(ValueError, match="not a regular file"):
        load(fifo)
    zero = tmp_path / "zero.safetensors"
    zero.symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(ValueError, match="not a regular file"):
        load(zero)
    with pytest.raises(ValueError, match="not a regular file"):
        load(tmp_path)
    with pytest.raises(ValueError, match="is not a readable mumoe weights file: cannot stat it"):
        load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("write", "match"),
    [
        (lambda p: np.savez(p, a=np.zeros(3)), r"it is a NumPy \.npz archive .*numpy\.load"),
        (lambda p: np.save(p, np.zeros(3)), r"it is a NumPy \.npy array"),
        (lambda p: p.write_bytes(b"\x80\x02}q\x00." + bytes(64)), r"it is a Python pickle"),
        (lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64)), r"it is an HDF5 file"),
    ],
    ids=["npz", "npy", "pickle", "hdf5"],
)
def test_files_of_other_formats_are_named(tmp_path, write, match):
    # Issue #26, item 7: an .npz was "a header of 193,340,853,072 bytes".
    path = tmp_path / "weights.bin"
    write(path)
    if not path.exists():  # numpy adds its extension
        path = next(tmp_path.iterdir())
    with pytest.raises(ValueError, match=match):
        load(path)
