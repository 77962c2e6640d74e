"""Loading ONNX models whose weights live in an external data file, inside a bundle.

``onnx.load`` (1.16+) refuses an external data file with more than one hard link ("potential
hardlink attack"). A bundle stage works on a staging copy made of hard links to the unchanged
files, so while any stage runs, ``unet.onnx.data`` of a model above 1 GiB (the full-size
cin256-v2 UNet: 1.6 GB) has two links and every ``onnx.load`` of it fails. This loader reads the
external tensors itself, with the check that matters here: each location must be a plain file
name relative to the model's own folder (no absolute path, no ``..``, no symlink out of it).
"""

from __future__ import annotations

from pathlib import Path


def load_model(path: str | Path):
    """``onnx.load(path)`` with its external data read in (see the module doc)."""
    import onnx
    from onnx import TensorProto

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    root = path.parent.resolve()
    handles: dict[str, object] = {}
    try:
        for t in _tensors(model.graph):
            if t.data_location != TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            loc = info.get("location", "")
            target = (root / loc).resolve()
            if not loc or Path(loc).is_absolute() or ".." in Path(loc).parts or target.parent != root:
                raise ValueError(f"{path.name}: tensor {t.name} points at external data {loc!r} outside its folder")
            f = handles.get(loc)
            if f is None:
                f = handles[loc] = open(target, "rb")  # noqa: SIM115 - closed below
            f.seek(int(info.get("offset", 0)))
            n = info.get("length")
            t.raw_data = f.read(int(n)) if n is not None else f.read()
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
    finally:
        for f in handles.values():
            f.close()
    return model


def _tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.t is not None and attr.HasField("t"):
                yield attr.t
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(g)
