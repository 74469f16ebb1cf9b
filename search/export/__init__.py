"""Exports that really run: config.json, bit-packed weights, size breakdown, and ONNX (onnx/)."""
