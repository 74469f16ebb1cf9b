"""Pricing: the roofline cost model, budgets, calibration, and timing an export in onnxruntime."""
