"""What ``ptqd serve`` accepts: a ``POST /generate`` JSON body checked field by field before any work, so that a bad
request gets a 4xx naming the field and the fix, never a 500 (stdlib + numpy; no Ray).

    {"prompt": "a red cat", "negative_prompt": "", "steps": 20, "guidance": 7.5, "seed": 1, "num": 1,
     "precision": "auto"}                     # text-to-image bundles
    {"class": 207, "steps": 20, "guidance": 3.0, "seed": 1, "num": 4}        # class-conditional bundles
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass

MAX_BODY = 64 * 1024  # bytes of JSON: a prompt, not a payload
MAX_PROMPT = 2000  # characters
MAX_SEED = 2**63 - 1


class BadRequest(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line message for the caller."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeSpec:
    """What a served bundle can do, for checking requests without opening it: its conditioning, its loaded
    precisions and the limits the server was started with."""

    kind: str  # text | class | none
    num_classes: int
    null_class: int
    precisions: tuple[str, ...]  # the first is the default
    max_steps: int
    max_num: int
    default_steps: int = 20
    default_guidance: float = 3.0


@dataclass(frozen=True)
class GenRequest:
    prompt: str | None
    label: int | None
    negative_prompt: str
    steps: int
    guidance: float
    seed: int
    num: int
    precision: str
    fmt: str  # png (one image) | json

    def group(self) -> tuple:
        """Requests with the same key share one UNet batch: same engines, steps, guidance and negative prompt."""
        return self.precision, self.steps, self.guidance, self.negative_prompt


FIELDS = ("prompt", "class", "negative_prompt", "steps", "guidance", "seed", "num", "precision", "format")


def _int(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(400, f"'{key}' must be an integer from {lo} to {hi}, got {json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise BadRequest(400, f"'{key}' must be from {lo} to {hi}, got {v}")
    return v


def parse_request(body: bytes, spec: ServeSpec) -> GenRequest:
    """A checked request, or :class:`BadRequest` (400 bad field, 413 too large)."""
    if len(body) > MAX_BODY:
        raise BadRequest(413, f"request body is {len(body)} bytes; the limit is {MAX_BODY}")
    try:
        obj = json.loads(body or b"null")
    except (ValueError, RecursionError) as e:
        raise BadRequest(400, f"body is not JSON ({str(e)[:120]}); send e.g. {example(spec)}") from None
    if not isinstance(obj, dict):
        raise BadRequest(400, f"body must be a JSON object such as {example(spec)}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise BadRequest(400, f"unknown field(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(FIELDS)}")
    prompt = label = None
    if spec.kind == "text":
        prompt = obj.get("prompt")
        if "class" in obj:
            raise BadRequest(400, "this model is conditioned on text: send 'prompt', not 'class'")
        if not isinstance(prompt, str):
            raise BadRequest(400, f"'prompt' (a string) is required, e.g. {example(spec)}")
        if len(prompt) > MAX_PROMPT:
            raise BadRequest(413, f"'prompt' has {len(prompt)} characters; the limit is {MAX_PROMPT}")
    elif spec.kind == "class":
        if "prompt" in obj or "negative_prompt" in obj:
            raise BadRequest(400, "this model is class-conditional: send 'class', not a prompt")
        if "class" not in obj:
            raise BadRequest(400, f"'class' is required, e.g. {example(spec)}")
        label = _int(obj, "class", 0, 0, spec.num_classes - 1)
        if label == spec.null_class:
            raise BadRequest(400, f"'class' {label} is the null class (guidance's unconditional row); pick another")
    elif "prompt" in obj or "class" in obj or "negative_prompt" in obj:
        raise BadRequest(400, "this model is unconditional: send neither 'prompt' nor 'class'")
    negative = obj.get("negative_prompt", "")
    if not isinstance(negative, str) or len(negative) > MAX_PROMPT:
        raise BadRequest(400, f"'negative_prompt' must be a string of at most {MAX_PROMPT} characters")
    guidance = obj.get("guidance", spec.default_guidance if spec.kind != "none" else 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise BadRequest(400, f"'guidance' must be a finite number, got {json.dumps(guidance)[:40]}")
    if not 0.0 <= guidance <= 50.0:
        raise BadRequest(400, f"'guidance' must be from 0 to 50, got {guidance}")
    if spec.kind == "none" and guidance != 1.0:
        raise BadRequest(400, "this model is unconditional: guidance must be 1 (or left out)")
    precision = obj.get("precision", spec.precisions[0])
    if precision not in spec.precisions:
        raise BadRequest(400, f"'precision' must be one of {', '.join(spec.precisions)} (what this server loaded), "
                              f"got {json.dumps(precision)[:40]}")
    num = _int(obj, "num", 1, 1, spec.max_num)
    fmt = obj.get("format", "png" if num == 1 else "json")
    if fmt not in ("png", "json") or (fmt == "png" and num != 1):
        raise BadRequest(400, "'format' must be 'json', or 'png' for one image (num 1)")
    seed = _int(obj, "seed", secrets.randbelow(2**31), 0, MAX_SEED)  # drawn here, so a retry gives the same image
    return GenRequest(prompt, label, negative, _int(obj, "steps", spec.default_steps, 1, spec.max_steps),
                      float(guidance), seed, num, precision, fmt)


def example(spec: ServeSpec) -> str:
    if spec.kind == "text":
        return '{"prompt": "a red cat", "steps": 20, "seed": 1}'
    if spec.kind == "class":
        return f'{{"class": {1 if spec.null_class == 0 else 0}, "steps": 20, "seed": 1}}'
    return '{"steps": 20, "seed": 1}'
