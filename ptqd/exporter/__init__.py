"""torch -> validated FP32 ONNX (UNet, first-stage decoder, text encoder), plus the layer table."""

from ptqd.exporter.onnx_export import ExportConfig, export_first_stage, export_text_encoder, export_unet
from ptqd.exporter.validate import ValidationConfig, validate_first_stage, validate_text_encoder, validate_unet

__all__ = ["ExportConfig", "ValidationConfig", "export_unet", "export_first_stage", "export_text_encoder",
           "validate_unet", "validate_first_stage", "validate_text_encoder"]
