"""The torch reference runner (the source or fake-quant model; imports torch when one is made)."""

from __future__ import annotations

import numpy as np

from ptqd.engines.runner import Runner


class TorchRunner(Runner):
    """Runs an EpsModel on ``device`` (the model is moved there); numpy in, numpy out."""

    name = "torch"

    def __init__(self, eps_model, device=None):
        import torch

        self.torch = torch
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.model = eps_model.eval()
        if self.device.type != "cpu":
            self.model = self.model.to(self.device)

    def infer(self, x, t, context):
        torch = self.torch
        args = [torch.from_numpy(x), torch.from_numpy(t)]
        if context is not None:
            args.append(torch.from_numpy(context))
        with torch.no_grad():
            out = self.model(*(a.to(self.device) for a in args))
        return out.cpu().numpy().astype(np.float32)
