"""ONNX export: the jaxpr converter, one graph builder, layer rules and the integer-kernel rewrite."""
