"""Fine-tune and evaluate K plans with one XLA compile per study; the K choice per machine."""
