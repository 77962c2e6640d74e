"""BOPs accounting on the full-size LDM-4 ImageNet (cin256-v2) layer table, shipped as test data
(regenerated and compared by the slow full-size export test)."""

import gzip
import json
from pathlib import Path

import pytest

from ptqd.calib.bops import bops, layer_bits

TABLE = Path(__file__).parent.parent / "data" / "cin256_layers.json.gz"


def rows():
    return json.loads(gzip.decompress(TABLE.read_bytes()))["layers"]


def test_cin256_fp32_bops_match_the_paper():
    r = rows()
    fp = bops(r, layer_bits(r, "fp32"))
    assert fp == pytest.approx(102.2e12, rel=0.005)  # PTQD's LDM-4 ImageNet FP32 figure


def test_cin256_bops_per_precision_are_ordered_and_count_float_layers_at_32_bits():
    r = rows()
    fp = bops(r, {})
    got = {p: bops(r, layer_bits(r, p)) for p in ("w8a8", "w4a8", "w4a4", "ort-int8")}
    assert fp > got["w8a8"] > got["w4a8"] > got["w4a4"]
    assert got["ort-int8"] == pytest.approx(fp / 16)
    # every conv / linear layer is quantized; skip/downsample convs and embedding Gemms (PTQD's float
    # layers) at 8 bits in every precision
    w4 = layer_bits(r, "w4a8")
    assert all(x["name"] in w4 for x in r if x["kind"] in ("conv", "linear"))
    # w8a8 keeps the skip and downsample convs float (their outputs join the residual stream)
    float_macs = sum(x["macs"] for x in r if x["kind"] in ("conv", "linear") and x["name"] not in layer_bits(r, "w8a8"))
    assert 0 < float_macs < 0.05 * sum(x["macs"] for x in r if x["kind"] in ("conv", "linear"))
    assert got["w8a8"] == pytest.approx((fp - 1024 * float_macs) / 16 + 1024 * float_macs)
    eight = [x for x in r if w4.get(x["name"]) == (8, 8)]
    assert any(x["module"].endswith("skip_connection") for x in eight) and any(x["op"] == "Gemm" for x in eight)
    assert 16 < fp / got["w4a8"] < 32


def test_calibrated_layers_override_the_default_selection():
    r = rows()
    name = next(x["name"] for x in r if x["kind"] == "conv")
    bits = layer_bits(r, "w4a4", calibrated=[{"name": name, "w_bits": 4, "a_bits": 4}])
    assert bits == {name: (4, 4)}
