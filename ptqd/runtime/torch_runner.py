"""A torch runner for reference (imports torch; never imported by ``ptqd.runtime`` itself)."""

from __future__ import annotations

import numpy as np

from ptqd.runtime.runners import Runner


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, eps_model):
        import torch

        self.torch = torch
        self.model = eps_model.eval()

    def infer(self, x, t, context):
        torch = self.torch
        args = [torch.from_numpy(x), torch.from_numpy(t)]
        if context is not None:
            args.append(torch.from_numpy(context))
        with torch.no_grad():
            return self.model(*args).numpy().astype(np.float32)
