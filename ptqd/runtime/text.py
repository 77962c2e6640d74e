"""Prompts -> cross-attention contexts without torch: the bundle's ``tokenizers`` file gives the pipeline's
token ids (padded to ``max_length`` with its pad token, truncated keeping BOS and EOS), and the exported
text encoder runs on ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptqd.bundle import layout
from ptqd.errors import MissingDependencyError, UserError


class PromptEncoder:
    """``encode(prompts) -> [N, tokens, D]`` for a text-to-image bundle (SDXL: two tokenizers feed one exported
    graph of both encoders)."""

    def __init__(self, b, threads: int | None = None):
        if not (b.has(layout.TEXT_ENCODER_ONNX) and b.has(layout.TOKENIZER_JSON)):
            raise UserError(f"{b.root} is not a text-to-image bundle (no text encoder): sample it without --prompt")
        from ptqd.engines.onnxruntime import ort_session

        self.tokenizers = [self._tokenizer(b, layout.TOKENIZER_JSON, layout.TOKENIZER_CONFIG)]
        if b.has(layout.TOKENIZER_2_JSON):
            self.tokenizers.append(self._tokenizer(b, layout.TOKENIZER_2_JSON, layout.TOKENIZER_2_CONFIG))
        config = b.read_json(layout.TOKENIZER_CONFIG)
        self.zero_empty_prompt = bool(config.get("zero_empty_prompt", False))
        self.time_ids = config.get("time_ids")  # SDXL: where the context carries the six time ids (None: baked)
        self.session = ort_session(b.path(layout.TEXT_ENCODER_ONNX), threads)

    @staticmethod
    def _tokenizer(b, rel_json: str, rel_config: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise MissingDependencyError("prompts need the tokenizers library: pip install tokenizers") from None
        settings = b.read_json(rel_config)
        tok = Tokenizer.from_str(b.read_bytes(rel_json).decode())
        tok.enable_truncation(max_length=int(settings["max_length"]))
        tok.enable_padding(length=int(settings["max_length"]), pad_id=int(settings["pad_id"]),
                           pad_token=str(settings["pad_token"]))
        return tok

    def token_ids(self, prompts: list[str], which: int = 0) -> np.ndarray:
        """[N, max_length] int64, as the pipeline's own tokenizer (``which``: 0 or SDXL's second, 1) gives them."""
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise UserError(f"prompts must be text, got {bad[:3]}")
        return np.array([e.ids for e in self.tokenizers[which].encode_batch(list(prompts))], dtype=np.int64)

    def encode(self, prompts: list[str], batch: int = 16) -> np.ndarray:
        """Contexts [N, tokens, D]; an empty prompt is zeros where the pipeline says so (SDXL's
        ``force_zeros_for_empty_prompt``: no negative prompt, zero embeddings, the default call's time ids, which
        ``ptqd.runtime.pipe.with_time_ids`` replaces for a call with other sizes)."""
        ids = [self.token_ids(prompts, k) for k in range(len(self.tokenizers))]
        names = ["input_ids", "input_ids_2"][:len(ids)]
        out = [self.session.run(["context"], {n: a[i:i + batch] for n, a in zip(names, ids)})[0]
               for i in range(0, len(prompts), batch)]
        ctx = np.concatenate(out).astype(np.float32)
        if self.zero_empty_prompt:
            zero_prompts(ctx, [k for k, p in enumerate(prompts) if p == ""], self.time_ids)
        return ctx

    def table(self, prompts: list[str], negative_prompt: str = "") -> np.ndarray:
        """The table sampling indexes: row 0 the negative prompt, rows 1.. the prompts ([1 + N, tokens, D])."""
        return self.encode([negative_prompt, *prompts])


def set_time_ids(ctx: np.ndarray, slot: dict, ids) -> np.ndarray:
    """Write the six time ids into every row of ``ctx`` [N, tokens, D] (in place) at ``slot``; returns ``ctx``."""
    ctx[:, slot["token"], slot["offset"]:slot["offset"] + 6] = np.asarray(ids, np.float32)
    return ctx


def zero_prompts(ctx: np.ndarray, rows: list[int], slot: dict | None) -> np.ndarray:
    """``force_zeros_for_empty_prompt``: zero the embeddings of ``rows`` (in place), keeping their time ids (SDXL
    feeds a zero negative prompt with the call's time ids, not with zero ids)."""
    keep = None if slot is None else ctx[rows, slot["token"], slot["offset"]:slot["offset"] + 6].copy()
    ctx[rows] = 0.0
    if keep is not None:
        ctx[rows, slot["token"], slot["offset"]:slot["offset"] + 6] = keep
    return ctx


def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts {path}: cannot read it ({e})") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in it (one prompt a line)")
    return prompts
