"""Crafted weights files, the message each gets, and the peak memory of loading it.

``python -m benchmarks.crafted_files``: writes a small trained layer, crafts each hostile
file from it (the same kinds ``tests/nn/test_io.py`` refuses), loads each in a fresh
process, and prints the message and the process's peak resident memory after importing
:mod:`mumoe.inference` and after the load: what loading the file added.  The tests hold
the messages; this script measures the memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

from mumoe.inference import load
from mumoe.nn import CPMuMoE, save

PEAK = "import resource\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def header(path):
    """The JSON header and the body of a safetensors file."""
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def with_header(path, head, body):
    """Write ``head`` (JSON) and ``body`` to ``path`` as a safetensors file."""
    raw = json.dumps(head).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + body)


def with_meta(path, head, body, **fields):
    """Rewrite the file with ``fields`` changed in its mumoe description."""
    head["__metadata__"]["mumoe"] = json.dumps(
        {**json.loads(head["__metadata__"]["mumoe"]), **fields}
    )
    with_header(path, head, body)


def rewrite_bytes(path, change):
    """Rewrite the file's bytes through ``change``."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(change(data))


CASES = {
    "truncated (half the file)": lambda p, h, b: rewrite_bytes(p, lambda d: d[: len(d) // 2]),
    "bit-flipped header length": lambda p, h, b: rewrite_bytes(p, lambda d: b"\xff" + d[1:]),
    "bit-flipped header JSON": lambda p, h, b: rewrite_bytes(
        p, lambda d: d.replace(b'"dtype"', b'"dtypf"', 1)
    ),
    "tensor larger than the file (10^12 entries)": lambda p, h, b: (
        h["cores.0"].__setitem__("shape", [10**6, 10**6]),
        with_header(p, h, b),
    ),
    "overlapping offsets": lambda p, h, b: (
        h["cores.1"].__setitem__("data_offsets", h["cores.0"]["data_offsets"]),
        with_header(p, h, b),
    ),
    "wrong dtype (I32)": lambda p, h, b: (
        h["cores.0"].__setitem__("dtype", "I32"),
        with_header(p, h, b),
    ),
    "metadata of the wrong type": lambda p, h, b: with_meta(p, h, b, expert_dims="six"),
    "metadata 100,000 deep": lambda p, h, b: (
        h["__metadata__"].__setitem__("mumoe", "[" * 100_000 + "]" * 100_000),
        with_header(p, h, b),
    ),
    "a 12 MB spec": lambda p, h, b: with_meta(p, h, b, spec="n1 r, " * 2_000_000),
}


def run(code):
    """The lines ``code`` prints in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()


def main():
    """Craft every file, load it in a fresh process, print the message and the memory."""
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "w.safetensors")
    for name, craft in CASES.items():
        torch.manual_seed(0)
        save(CPMuMoE(12, 5, expert_dims=(6, 3), rank=4).eval(), path)
        craft(path, *header(path))
        code = (
            "import mumoe.inference\n" + PEAK + "\n"
            f"try:\n    mumoe.inference.load({path!r})\n"
            "except ValueError as error:\n    print(error)\n" + PEAK
        )
        before, *message, after = run(code)
        shown = " ".join(message).replace(repr(path), "FILE")
        added = (int(after) - int(before)) / 1024
        print(f"- {name} ({os.path.getsize(path):,} bytes): {shown}")
        imported = int(before) / 1024
        print(f"  peak memory {imported:.0f} MB after the import, +{added:.1f} MB by the load")
    fifo = os.path.join(folder, "fifo")
    os.mkfifo(fifo)
    zero = os.path.join(folder, "zero")
    os.symlink("/dev/zero", zero)
    for name, target in (("a FIFO", fifo), ("a symlink to /dev/zero", zero)):
        try:
            load(target)
        except ValueError as error:
            print(f"- {name}: {str(error).replace(repr(target), 'FILE')}")


if __name__ == "__main__":
    main()
