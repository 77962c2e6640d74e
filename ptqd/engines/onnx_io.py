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


# Above 1 GiB of initializers a graph ptqd writes keeps them in <name>.data beside it (one protobuf cannot pass
# 2 GB: SDXL's int8 weights alone are 2.6 GB)
EXTERNAL_DATA_THRESHOLD = 1 << 30


def load_model(path: str | Path, skip=()):
    """``onnx.load(path)`` with its external data read in (see the module doc), except for the initializers
    named in ``skip`` (left pointing at their file: a caller that replaces them, and never saves them,
    need not hold them; the QDQ writer and a layer's float weight)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    read_external(model, path, skip)
    return model


def read_external(model, path: str | Path, skip=()) -> None:
    """Read in, in place, the external data of ``model`` (loaded from ``path`` without it), but ``skip``'s."""
    from onnx import TensorProto

    path = Path(path)
    skip = set(skip)
    root = path.parent.resolve()
    handles: dict[str, object] = {}
    try:
        for t in _tensors(model.graph):
            if t.data_location != TensorProto.EXTERNAL or t.name in skip:
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


def model_size(model) -> int:
    """About the serialized size of ``model`` (its initializers and nodes; ``ModelProto.ByteSize`` itself
    raises past protobuf's 2 GB, which is what callers need to know the model is near)."""
    g = model.graph
    return sum(t.ByteSize() for t in g.initializer) + sum(n.ByteSize() for n in g.node)


def external_size(model) -> bool:
    """Whether ``model``'s initializers pass :data:`EXTERNAL_DATA_THRESHOLD`: it is saved with a ``.data`` file,
    and cannot be serialized to bytes (protobuf's 2 GB limit) on its way to ONNX Runtime."""
    return sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD


def save_model(model, path: str | Path, check: bool = True) -> list[Path]:
    """Save ``model`` at ``path``; above :data:`EXTERNAL_DATA_THRESHOLD` of initializers, with them in
    ``<name>.data`` beside it (a stale one from an earlier save is removed otherwise). Checks the model (unless
    ``check`` is false: a scratch graph whose extra outputs carry no types), by path where it is external (the
    in-memory checker cannot pass 2 GB). Returns the files written."""
    import onnx

    path = Path(path)
    data = path.with_name(path.name + ".data")
    if not external_size(model):
        if check:
            onnx.checker.check_model(model)
        onnx.save_model(model, str(path))
        data.unlink(missing_ok=True)
        return [path]
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=1024)
    if check:
        onnx.checker.check_model(str(path))
    return [path, data]


def _tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.t is not None and attr.HasField("t"):
                yield attr.t
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(g)


def graph_index(g) -> tuple[dict, dict, set]:
    """(producer, readers, outputs) of graph ``g``: tensor -> the node that makes it, tensor -> the nodes that read
    it (once per input slot), and the names of the graph's outputs."""
    producer = {o: n for n in g.node for o in n.output}
    readers: dict = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    return producer, readers, {o.name for o in g.output}


def attr(node, name: str, default=None):
    """The value of ``node``'s attribute ``name`` (ints as a list, an int as an int), or ``default``."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def dequantized_const(t: str, inits, producer: dict):
    """The DequantizeLinear node that makes tensor ``t`` from initializers alone (a quantized weight), or None.
    ``inits``: the graph's initializer names (any container); ``producer`` from :func:`graph_index`."""
    d = producer.get(t)
    if d is not None and d.op_type == "DequantizeLinear" and all(x in inits for x in d.input if x):
        return d
    return None


def prune(g) -> int:
    """Drop nodes whose outputs nothing reads (iterated) and initializers nothing reads. Returns nodes dropped."""
    before = len(g.node)
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    return before - len(keep)
