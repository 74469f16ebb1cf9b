"""Pure JAX compression: plan arrays, layer discovery, masks, quantization, codebooks and the
effective-params transform. No Optuna, no I/O."""
