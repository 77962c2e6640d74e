"""4-bit weights stored two per byte in an ONNX Runtime engine, expanded to int8 when it is loaded.

ONNX Runtime has no 4-bit conv kernel (MEASURED.md: INT4 Q/DQ weights run as float convs, 0.55x), so
a 4-bit engine computes on the int8 kernels with its weights on the 4-bit grid [-7, 7]. Stored as
int8 those weights would make a w4 engine as large as a w8 one. So the engine file keeps them as ONNX
INT4 initializers (same name and shape, two's-complement nibbles, the first element in the low
nibble: the ONNX packing), and the loader expands them back to the int8 tensors the kernels read
before the session is created from the model's bytes. The file is marked in its ``doc_string``
(serialized before the graph, so a reader peeks at the first bytes instead of parsing the file);
a marked file is only loadable through :func:`load_session_bytes` (ONNX Runtime refuses INT4 where
its int8 kernels expect INT8).
"""

from __future__ import annotations

import os

import numpy as np

MARKER = "ptqd-int4-packed"
_PEEK = 4096


def is_packed(path: str | os.PathLike) -> bool:
    """True for an engine whose 4-bit weights are packed (the marker sits in the file's first bytes)."""
    with open(path, "rb") as f:
        return MARKER.encode() in f.read(_PEEK)


def pack_nibbles(q: np.ndarray) -> bytes:
    """int8 values in [-8, 7] -> ONNX INT4 raw data (two per byte, first element in the low nibble)."""
    flat = np.ascontiguousarray(q, np.int8).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("values outside the 4-bit range [-8, 7] cannot be packed")
    u = (flat.astype(np.uint8) & 0x0F)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_nibbles(raw: bytes, count: int) -> np.ndarray:
    """ONNX INT4 raw data -> ``count`` int8 values (sign-extended)."""
    b = np.frombuffer(raw, np.uint8)
    out = np.empty(2 * b.size, np.uint8)
    out[0::2] = b & 0x0F
    out[1::2] = b >> 4
    return ((out[:count].astype(np.int8) ^ 8) - 8).astype(np.int8)


def pack_initializers(model, names) -> int:
    """Store the int8 initializers ``names`` (all values in [-8, 7]) as INT4, in place, and mark the model.
    Returns the bytes saved."""
    from onnx import TensorProto, numpy_helper

    want, saved = set(names), 0
    for init in model.graph.initializer:
        if init.name not in want:
            continue
        if init.data_type != TensorProto.INT8:
            raise ValueError(f"{init.name}: only int8 initializers can be packed, got data type {init.data_type}")
        q = numpy_helper.to_array(init)
        raw = pack_nibbles(q)
        name, dims = init.name, list(init.dims)
        init.Clear()
        init.name, init.data_type, init.raw_data = name, TensorProto.INT4, raw
        init.dims.extend(dims)
        saved += q.size - len(raw)
    if want:
        model.doc_string = (f"{MARKER}: 4-bit weights stored as INT4; load with ptqd.engines.packed."
                            "load_session_bytes (expands them to the int8 kernels' layout)")
    return saved


def expand_initializers(model) -> int:
    """Expand every INT4 initializer back to INT8, in place (what the int8 kernels read). Returns the count."""
    from onnx import TensorProto

    n = 0
    for init in model.graph.initializer:
        if init.data_type != TensorProto.INT4:
            continue
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        q = unpack_nibbles(init.raw_data, count)
        init.data_type = TensorProto.INT8
        init.raw_data = q.tobytes()
        n += 1
    if model.doc_string.startswith(MARKER):
        model.doc_string = ""
    return n


def load_expanded(path: str | os.PathLike):
    """The engine's ModelProto with its packed weights expanded to int8."""
    from ptqd.engines.onnx_io import load_model

    model = load_model(path)
    expand_initializers(model)
    return model


PROTOBUF_LIMIT = 2**31 - 1 - (64 << 20)  # a serialized ModelProto stays below 2 GB (with room for its graph)
IN_MEMORY = "ptqd-in-memory"  # the external-data location of an initializer handed to ONNX Runtime in memory


def load_session_bytes(path: str | os.PathLike, so=None, limit: int = PROTOBUF_LIMIT):
    """The serialized model ONNX Runtime can load: packed weights expanded (in memory; the file stays packed).

    One protobuf cannot pass 2 GB. Above ``limit``, with the session options ``so`` given, the largest int8
    weights leave the protobuf and go to ONNX Runtime as arrays (``add_external_initializers``: it copies them in
    before it optimizes the graph); returns (bytes, the arrays, to be kept until the session exists) then.
    Without ``so`` returns the bytes, and a larger engine is refused in one line."""
    from ptqd.engines.onnx_io import model_size

    model = load_expanded(path)
    size = model_size(model)
    if size <= limit:
        return model.SerializeToString() if so is None else (model.SerializeToString(), [])
    if so is None:
        from ptqd.errors import UserError

        raise UserError(f"{path}: its 4-bit weights expand to {size / 1e9:.2f} GB, over the 2 GB a model passed "
                        "in memory may take; load it through ptqd.engines.onnxruntime.ort_session")
    from onnx import TensorProto, numpy_helper
    from onnxruntime import OrtValue

    names, values = [], []
    big = sorted((t for t in model.graph.initializer if t.data_type == TensorProto.INT8 and len(t.raw_data) >= 1024),
                 key=lambda t: -len(t.raw_data))
    for init in big:
        if size <= limit:
            break
        size -= len(init.raw_data)
        values.append(OrtValue.ortvalue_from_numpy(numpy_helper.to_array(init).copy()))
        names.append(init.name)
        init.ClearField("raw_data")
        init.data_location = TensorProto.EXTERNAL
        for key, value in (("location", IN_MEMORY), ("offset", "0"), ("length", str(values[-1].numpy().nbytes))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
    so.add_external_initializers(names, values)
    return model.SerializeToString(), values
