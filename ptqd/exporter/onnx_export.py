"""torch -> FP32 ONNX for the UNet and the first-stage decoder.

The exported UNet signature (documented in the README):

  inputs   x        float32 [B, C, H, W]   latent x_t
           t        float32 [B]            timestep (float, so fractional t also works)
           context  float32 [B, L, D]      cross-attention context; only for conditioned models.
                                           For class-conditional LDMs it is the class embedding
                                           row (L = 1), looked up by the runtime from the bundle's
                                           ``cond/class_embedding.npy``.
  output   eps      float32 [B, C', H, W]

Context rather than labels: the graph then has no int64 Gather (friendlier to TensorRT), the
same graph serves class- and text-conditioned UNets, and classifier-free guidance is just
another context row. The batch axis is dynamic.

Opset 18: GroupNorm exports as Reshape -> InstanceNormalization (ORT's fast kernel); opset 21's
GroupNormalization has no ORT CPU kernel (MEASURED.md).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ptqd.errors import ExportError

DEFAULT_OPSET = 18
EXTERNAL_DATA_THRESHOLD = 1 << 30  # above 1 GiB of weights, tensors go to <name>.onnx.data (engines: onnx_io's)
LARGE = 2 << 30  # above 2 GiB of parameters, torch exports the graph without its weights and without constant
#                  folding (its serialized and folded copies would hold the weights two and three times: SDXL's
#                  10.3 GB UNet was killed at 23.6 GB); ptqd then writes each weight to the .data file itself,
#                  folding the linear layers' weight Transposes as it goes (peak: the model + 4 GB of tracing)


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass(frozen=True)
class ExportConfig:
    opset: int = DEFAULT_OPSET
    exporter: str = "torchscript"  # "torchscript" (fast, module-scoped node names) | "dynamo"

    def validate(self) -> None:
        if self.exporter not in ("torchscript", "dynamo"):
            raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {self.exporter!r}")
        if not 17 <= self.opset <= 21:
            raise ValueError(f"opset {self.opset} is outside the tested range 17..21")


def _export(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
            path: Path, cfg: ExportConfig) -> list[Path]:
    """Export and return the written files (the graph, plus its external data when large)."""
    cfg.validate()
    module = module.eval()
    work = path.with_name(path.name + ".export")  # torch writes a large model's tensors one file each, here
    work.mkdir(exist_ok=True)
    try:
        return _export_in(module, args, input_names, output_names, path, cfg, work / path.name)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _export_in(module, args, input_names, output_names, path: Path, cfg: ExportConfig, tmp: Path) -> list[Path]:
    large = param_bytes(module) > LARGE
    if cfg.exporter == "torchscript":
        dyn = {n: {0: "batch"} for n in input_names + output_names}
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")  # no_grad: a trace that records autograd keeps every activation
            torch.onnx.export(module, args, str(tmp), input_names=input_names, output_names=output_names,
                              opset_version=cfg.opset, dynamic_axes=dyn, dynamo=False, do_constant_folding=not large,
                              export_params=not large)
    else:
        batch = torch.export.Dim("batch", min=1, max=1024)
        shapes = tuple({0: batch} for _ in args)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(module, args, None, input_names=input_names, output_names=output_names,
                                     opset_version=cfg.opset, dynamic_shapes=shapes, dynamo=True)
            prog.save(str(tmp))
    import onnx

    model = onnx.load(str(tmp), load_external_data=False)
    model.producer_name, model.producer_version = "ptqd", __import__("ptqd").__version__
    if large and cfg.exporter == "torchscript":  # the graph came without its weights: ptqd writes them
        return _attach_params(model, module, path)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return gather_external(model, tmp.parent, path)  # never the whole model in memory twice
    model = onnx.load(str(tmp), load_external_data=True)
    model.producer_name, model.producer_version = "ptqd", __import__("ptqd").__version__
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    if weights > EXTERNAL_DATA_THRESHOLD:
        data = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        return [path, path.with_name(data)]
    onnx.save_model(model, str(path))
    return [path]


ALIGN = 1 << 16  # external tensors start on 64 KiB boundaries: ONNX Runtime can map them instead of copying


def gather_external(model, src_dir: Path, path: Path) -> list[Path]:
    """A model over 2 GB as an exporter leaves it (each tensor in its own file in ``src_dir``) -> ``path`` plus ONE
    ``<name>.data`` file, written tensor by tensor, so that the model is never in memory twice."""
    import onnx
    from onnx import numpy_helper

    root = src_dir.resolve()

    def raw_of(t) -> bytes:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            loc = info.get("location", "")
            src = (root / loc).resolve()
            if not loc or src.parent != root:
                raise ExportError(f"the exporter wrote tensor {t.name} outside its folder ({loc!r})", check="ONNX export")
            with open(src, "rb") as f:
                f.seek(int(info.get("offset", 0)))
                return f.read(int(info["length"])) if "length" in info else f.read()
        return t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()

    return _write_external(model, path, raw_of)


def _attach_params(model, module: torch.nn.Module, path: Path) -> list[Path]:
    """A graph exported with ``export_params=False`` (its weights are graph inputs named by ``module``'s state dict
    keys) -> ``path`` + ``<name>.data`` with every weight as an initializer, copied from torch one at a time."""
    import onnx

    state = module.state_dict(keep_vars=True)
    g = model.graph
    params = [i for i in g.input if i.name in state]
    for i in params:
        arr = state[i.name].detach()
        g.initializer.append(onnx.TensorProto(
            name=i.name, dims=list(arr.shape),
            data_type=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(str(arr.dtype).removeprefix("torch.")))))
    kept = [i for i in g.input if i.name not in state]
    del g.input[:]
    g.input.extend(kept)

    def raw_of(t) -> bytes:
        v = state.get(t.name)
        if v is None:  # a constant the exporter made itself
            from onnx import numpy_helper

            return t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
        return v.detach().contiguous().cpu().numpy().tobytes()

    return _write_external(model, path, raw_of)


def _write_external(model, path: Path, raw_of) -> list[Path]:
    """Write ``model`` to ``path`` with every initializer's data (``raw_of(tensor) -> bytes``, one at a time) in
    ``<name>.data``, each at a 64 KiB-aligned offset. A Transpose of an initializer becomes the transposed
    initializer, as torch's constant folding would have written it (a linear layer's weight)."""
    import onnx

    data = path.with_name(path.name + ".data")
    g = model.graph
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    by_name = {t.name: t for t in g.initializer}
    folds = [n for n in g.node if n.op_type == "Transpose" and n.input[0] in by_name]
    perms = {}
    for n in folds:
        src = by_name[n.input[0]]
        perm = next((list(onnx.helper.get_attribute_value(a)) for a in n.attribute if a.name == "perm"),
                    list(range(len(src.dims)))[::-1])
        moved = onnx.TensorProto(name=n.output[0], data_type=src.data_type, dims=[src.dims[k] for k in perm])
        perms[moved.name] = (src, perm)
        g.initializer.append(moved)
        readers[src.name] -= 1
    if folds:
        dropped = {id(n) for n in folds}
        kept = [n for n in g.node if id(n) not in dropped]
        del g.node[:]
        g.node.extend(kept)
    unread = {t.name for t in g.initializer if readers.get(t.name, 1) <= 0 and t.name not in perms}
    with open(data, "wb") as out:
        for t in g.initializer:
            if t.name in unread:
                continue
            if t.name in perms:
                src, perm = perms[t.name]
                arr = np.frombuffer(raw_of(src), onnx.helper.tensor_dtype_to_np_dtype(src.data_type))
                raw = np.ascontiguousarray(arr.reshape(list(src.dims)).transpose(perm)).tobytes()
            elif t.data_location == onnx.TensorProto.EXTERNAL or t.ByteSize() > 1024 or not t.HasField("raw_data"):
                raw = raw_of(t)
                del t.float_data[:], t.int64_data[:], t.int32_data[:], t.double_data[:]
            else:
                continue
            out.write(b"\0" * (-out.tell() % ALIGN))
            offset = out.tell()
            out.write(raw)
            t.ClearField("raw_data")
            del t.external_data[:]
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                t.external_data.add(key=k, value=v)
            t.data_location = onnx.TensorProto.EXTERNAL
    keep = [t for t in g.initializer if t.name not in unread]  # read only by the folded Transposes
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.save_model(model, str(path))
    return [path, data]


def export_unet(loaded, path: Path, cfg: ExportConfig = ExportConfig(), batch: int | None = None) -> list[Path]:
    """``batch``: of the traced call (the graph's batch axis is dynamic either way); default 2, 1 for a model over
    LARGE (the trace's activations at SDXL's 1024x1024 are gigabytes per sample)."""
    facts = loaded.facts
    if batch is None:
        batch = 1 if param_bytes(loaded.unet) > LARGE else 2
    c, h, w = facts.latent_shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, w, generator=g)
    t = torch.linspace(1, facts.schedule.num_train_timesteps - 1, batch)
    args: tuple = (x, t)
    names = ["x", "t"]
    if loaded.unet.has_context:
        cond = facts.conditioning
        args += (torch.randn(batch, cond.context_tokens, cond.context_dim, generator=g),)
        names.append("context")
    try:
        return _export(loaded.unet, args, names, ["eps"], path, cfg)
    except Exception as e:  # torch's exporter errors are long; keep the first line, chain the cause
        raise ExportError(f"ONNX export of the UNet failed: {str(e).strip().splitlines()[0][:300]}",
                          check="ONNX export") from e


def export_first_stage(loaded, path: Path, cfg: ExportConfig = ExportConfig()) -> list[Path]:
    c, h, w = loaded.facts.latent_shape
    z = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(1))
    try:
        return _export(loaded.first_stage, (z,), ["z"], ["image"], path, cfg)
    except Exception as e:
        raise ExportError(f"ONNX export of the first-stage decoder failed: {str(e).strip().splitlines()[0][:300]}",
                          check="ONNX export") from e


def export_text_encoder(loaded, path: Path, cfg: ExportConfig = ExportConfig(), batch: int = 2) -> list[Path]:
    """The text encoder: ``input_ids`` int64 [B, tokens] (SDXL: and ``input_ids_2``) -> ``context`` float32
    [B, context tokens, D] (dynamic batch)."""
    tokens = int(loaded.tokenizer.model_max_length)
    vocab = int(loaded.text_encoder.model.config.vocab_size)
    rng = np.random.RandomState(2)
    names = ["input_ids"] + (["input_ids_2"] if loaded.tokenizer_2 is not None else [])
    ids = tuple(torch.from_numpy(rng.randint(0, vocab, (batch, tokens)).astype(np.int64)) for _ in names)
    try:
        return _export(loaded.text_encoder, ids, names, ["context"], path, cfg)
    except Exception as e:
        raise ExportError(f"ONNX export of the text encoder failed: {str(e).strip().splitlines()[0][:300]}",
                          check="ONNX export") from e
