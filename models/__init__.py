"""hwcompress: models."""
