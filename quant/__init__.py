"""Quantized weight formats and modules (the quantization issue fills this in)."""
