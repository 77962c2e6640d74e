"""Activation observers over the denoising steps, in bounded memory.

Two passes, so that memory does not grow with the number of layers:

1. ``record_trajectories``: the FP torch model runs along real sampler trajectories (classes x
   seeds, every step of the configured schedule, classifier-free guidance doubling the batch as
   the sampler does), ``batch`` samples at a time. For every quantized layer it keeps, per step,
   bounded statistics of its input (and, for convs, of its output, which ONNX Runtime's
   QLinearConv requantizes):

     min, max     exact, streaming
     samples      a uniform random subsample (``per_call`` values per call, drawn with
                  replacement): enough for the MSE and percentile range searches; memory is
                  O(layers x steps x calls x per_call), a few MB per layer

   and the UNet inputs of every call (x_t, t, context: latent-sized, a few MB in all), plus the
   order in which the layers run.

2. ``hessians``: for a *group* of layers, replay the recorded inputs (a few batch items per call)
   and accumulate H = E[x xᵀ] over sub-sampled input positions, for GPTQ and each layer's output
   error. Conv inputs are im2col patches (C_in·k_h·k_w rows), gathered at the sampled positions
   only. The replay stops right after the group's last layer has run. Callers size groups by
   ``hessian_bytes`` so that at most one group's H matrices (float32) live at a time: for the
   full-size cin256-v2 UNet they would be 12.5 GB all at once (float64: 25.5 GB).

Observers only observe: they never change what the model computes. Everything runs on the
model's device; statistics come back to the CPU as numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TensorStats:
    lo: float = np.inf
    hi: float = -np.inf
    samples: list = field(default_factory=list)

    def add(self, x, rng: np.random.RandomState, per_call: int) -> None:
        """Fold in one call's tensor (torch, any device). On the CPU this is numpy on the tensor's own
        memory (small torch ops pay a thread-pool barrier each); on a GPU only the picks leave it."""
        flat = x.detach().reshape(-1)
        take = rng.randint(0, flat.numel(), min(per_call, flat.numel()))
        if flat.device.type == "cpu":
            a = flat.numpy()
            self.lo, self.hi = min(self.lo, float(a.min())), max(self.hi, float(a.max()))
            self.samples.append(a[take].astype(np.float32))
            return
        import torch

        lo, hi = torch.aminmax(flat)
        self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))
        self.samples.append(flat[torch.from_numpy(take).to(flat.device)].float().cpu().numpy())

    def merged(self) -> np.ndarray:
        return np.concatenate(self.samples) if self.samples else np.zeros(0, np.float32)


@dataclass
class LayerObservation:
    name: str
    module: str
    kind: str  # "conv" | "linear"
    inputs: dict = field(default_factory=dict)  # step -> TensorStats
    outputs: dict = field(default_factory=dict)  # step -> TensorStats (convs)


@dataclass
class Recording:
    """What pass 1 leaves: per-layer statistics, the UNet calls, and the layers' execution order."""

    obs: dict  # node name -> LayerObservation
    feeds: list  # [(x, t, context | None)] numpy, one per UNet call, as the sampler sent them
    order: list  # node names in the order their layers first ran
    # attention matmul inputs (``calib.attention``): (index, "a" | "b") -> step -> TensorStats, and the
    # attention matmuls the UNet calls ran (their input shapes, each distinct sequence once)
    attention: dict = field(default_factory=dict)
    attention_seen: list = field(default_factory=list)

    @staticmethod
    def merge(parts: list["Recording"]) -> "Recording":
        """Recordings of consecutive trajectory chunks, in chunk order, as one run over all of them records:
        min/max folded, subsamples and feeds concatenated in order."""
        first = parts[0]
        obs = {}
        for name, o in first.obs.items():
            m = LayerObservation(o.name, o.module, o.kind)
            for part in parts:
                for mine, theirs in ((m.inputs, part.obs[name].inputs), (m.outputs, part.obs[name].outputs)):
                    for step, st in theirs.items():
                        acc = mine.setdefault(step, TensorStats())
                        acc.lo, acc.hi = min(acc.lo, st.lo), max(acc.hi, st.hi)
                        acc.samples.extend(st.samples)
            obs[name] = m
        att: dict = {}
        for part in parts:
            for key, per_step in part.attention.items():
                for step, st in per_step.items():
                    acc = att.setdefault(key, {}).setdefault(step, TensorStats())
                    acc.lo, acc.hi = min(acc.lo, st.lo), max(acc.hi, st.hi)
                    acc.samples.extend(st.samples)
        return Recording(obs, [f for part in parts for f in part.feeds], list(first.order), att,
                         [c for part in parts for c in part.attention_seen])


def trajectory_chunks(labels: np.ndarray, seeds, batch: int) -> list[tuple[int, int, int]]:
    """The chunks pass 1 runs, in order: (seed, first, stop) over ``labels``, ``batch`` trajectories each."""
    return [(int(s), s0, min(len(labels), s0 + batch)) for s in seeds for s0 in range(0, len(labels), batch)]


def hessian_bytes(row: dict) -> int:
    """Bytes of one layer's float32 H (K x K, K = the weight's contraction size)."""
    k = int(np.prod(row["weight_shape"][1:]))
    return 4 * k * k


def patch_rows(torch, mod, x, positions: int, gen):
    """Rows of the layer's contraction dim at ``positions`` random output positions: [N, K] float32.

    For a conv these are the im2col columns (C_in-major, then k_h, k_w: the order of the weight's
    [C_out, C_in·k_h·k_w] view), gathered only where sampled rather than unfolding the whole input."""
    if isinstance(mod, torch.nn.Linear):
        flat = x.reshape(-1, x.shape[-1])
        idx = torch.randint(0, flat.shape[0], (min(positions, flat.shape[0]),), generator=gen)
        return flat[idx.to(flat.device)].float()
    if x.dim() == 3:  # conv1d: a 1-row image
        x = x.unsqueeze(2)
        ks, pad, st, dil = (1, mod.kernel_size[0]), (0, mod.padding[0]), (1, mod.stride[0]), (1, mod.dilation[0])
    else:
        ks, pad, st, dil = mod.kernel_size, mod.padding, mod.stride, mod.dilation
    if isinstance(pad, str):
        raise ValueError(f"{mod}: string padding is not supported by the observer")
    b, c, h, w = x.shape
    ho = (h + 2 * pad[0] - dil[0] * (ks[0] - 1) - 1) // st[0] + 1
    wo = (w + 2 * pad[1] - dil[1] * (ks[1] - 1) - 1) // st[1] + 1
    n = min(positions, b * ho * wo)
    flat = torch.randint(0, b * ho * wo, (n,), generator=gen).to(x.device)
    bi, rem = flat // (ho * wo), flat % (ho * wo)
    oy, ox = rem // wo * st[0], rem % wo * st[1]
    xp = torch.nn.functional.pad(x, (pad[1], pad[1], pad[0], pad[0]))
    taps = [xp[bi, :, oy + dy * dil[0], ox + dx * dil[1]] for dy in range(ks[0]) for dx in range(ks[1])]  # [N, C]
    return torch.stack(taps, dim=2).reshape(n, c * ks[0] * ks[1]).float()  # [N, C, kh*kw] -> [N, K]


def record_trajectories(loaded, layers: list[dict], labels: np.ndarray, seeds, cfg, device, batch: int = 32,
                        per_call: int = 2048, progress=None, chunks: list | None = None,
                        attention: list[int] | None = None) -> Recording:
    """Pass 1: run FP trajectories with statistics hooks on ``layers`` (layer-table rows; their
    ``module`` names address the torch modules). ``progress`` advances by one per trajectory chunk.
    ``attention``: indices of the attention matmuls whose inputs to observe (``calib.attention``).
    ``chunks``: run only these of :func:`trajectory_chunks` (a shard); each chunk subsamples with its own
    random stream, so shards merged in order (:meth:`Recording.merge`) equal one run over every chunk."""

    from ptqd.runtime.pipeline import sample_latents
    from ptqd.runtime.sampler import DDIMSampler
    from ptqd.engines.torch_ref import TorchRunner

    unet = loaded.unet.unet
    obs = {r["name"]: LayerObservation(r["name"], r["module"], r["kind"]) for r in layers}
    state = {"step": 0, "rng": None}
    order: list[str] = []
    seen: set[str] = set()
    handles = []

    def make_hooks(o: LayerObservation, mod):
        def pre(_m, args):
            if o.name not in seen:
                seen.add(o.name)
                order.append(o.name)
            o.inputs.setdefault(state["step"], TensorStats()).add(args[0], state["rng"], per_call)

        def post(_m, _args, y):
            o.outputs.setdefault(state["step"], TensorStats()).add(y, state["rng"], per_call)

        handles.append(mod.register_forward_pre_hook(pre))
        if o.kind == "conv":
            handles.append(mod.register_forward_hook(post))

    for o in obs.values():
        make_hooks(o, unet.get_submodule(o.module))

    feeds: list[tuple] = []
    runner = TorchRunner(loaded.unet, device)
    sampler = DDIMSampler(loaded.facts.schedule.alphas_cumprod, cfg.spacing)
    sampler.set_timesteps(cfg.steps)
    step_of_t = {int(t): i for i, t in enumerate(sampler.timesteps)}

    att_stats: dict = {}
    att_seen: list = []

    def stepped(x, t, c=None):
        state["step"] = step_of_t[int(t[0])]
        feeds.append((x.copy(), t.copy(), None if c is None else c.copy()))
        if not attention:
            return runner(x, t, c)
        from ptqd.calib.attention import Observer
        from ptqd.models.attention import hooked

        obs_hook = Observer(att_stats, state["step"], state["att_rng"], per_call, set(attention), att_seen,
                            TensorStats)
        with hooked(obs_hook):
            out = runner(x, t, c)
        obs_hook.close()
        return out

    try:
        for s, s0, stop in trajectory_chunks(labels, seeds, batch) if chunks is None else chunks:
            idx = np.arange(s0, stop)
            state["rng"] = np.random.RandomState([s, s0])  # the chunk's own stream: shards merge to one run
            state["att_rng"] = np.random.RandomState([s, s0, 1])  # attention's: layers subsample as without it
            sample_latents(stepped, loaded.facts, loaded.class_embedding, labels[idx], idx, s, cfg)
            if progress is not None:
                progress.update(1)
    finally:
        for h in handles:
            h.remove()
    return Recording(obs, feeds, order, att_stats, att_seen)


class GroupDone(Exception):
    """Raised inside the replay once the group's last layer has run (the rest of the UNet is not needed)."""


H_ROWS = 10240  # sampled input rows per layer for H (20 steps x 512 positions, as one demo trajectory batch)


def hessians(loaded, layers: list[dict], feeds: list[tuple], device, rows: int = H_ROWS, items: int = 4,
             seed: int = 0) -> dict:
    """Pass 2 for one group: {node name: H = E[x xᵀ] (torch float32 [K, K] on ``device``)}.

    ``layers`` are rows in execution order. Each recorded call is replayed on ``items`` of its batch
    items (spread over the batch, so both halves of a guided batch take part), and each layer adds
    ``rows / calls`` sampled input rows per call: the cost of H is K² x ``rows`` per layer whatever
    the number of trajectories."""
    import torch

    positions = max(1, -(-rows // max(len(feeds), 1)))
    unet = loaded.unet.unet
    gen = torch.Generator().manual_seed(seed)
    acc: dict[str, list] = {}
    last = layers[-1]["name"]
    handles = []

    def make_hook(row, mod):
        def pre(_m, args):
            cols = patch_rows(torch, mod, args[0].detach(), positions, gen)
            slot = acc.get(row["name"])
            if slot is None:
                acc[row["name"]] = [cols.T @ cols, cols.shape[0]]
            else:
                slot[0].addmm_(cols.T, cols)  # in place: no second K x K matrix
                slot[1] += cols.shape[0]
            if row["name"] == last:
                raise GroupDone

        handles.append(mod.register_forward_pre_hook(pre))

    for r in layers:
        make_hook(r, unet.get_submodule(r["module"]))
    replay(loaded, feeds, device, items, handles)
    return {name: h.div_(max(n, 1)) for name, (h, n) in acc.items()}


def replay(loaded, feeds: list[tuple], device, items: int, handles: list) -> None:
    """Run the recorded UNet calls, each on ``items`` of its batch items (spread over the batch, so both halves of
    a guided batch take part), for the forward hooks ``handles``; a hook raising :class:`GroupDone` ends that call.
    The hooks are removed afterwards."""
    from ptqd.engines.torch_ref import TorchRunner

    runner = TorchRunner(loaded.unet, device)
    try:
        for x, t, c in feeds:
            pick = np.unique(np.linspace(0, len(x) - 1, min(items, len(x))).round().astype(int))
            try:
                runner(x[pick], t[pick], None if c is None else c[pick])
            except GroupDone:
                pass
    finally:
        for h in handles:
            h.remove()


def groups_by_memory(rows: list[dict], budget_bytes: int) -> list[list[dict]]:
    """Consecutive groups (in execution order) whose H matrices together fit ``budget_bytes``
    (a layer larger than the budget gets a group of its own)."""
    out: list[list[dict]] = []
    size = 0
    for r in rows:
        nb = hessian_bytes(r)
        if out and size + nb <= budget_bytes:
            out[-1].append(r)
            size += nb
        else:
            out.append([r])
            size = nb
    return out
