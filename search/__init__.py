"""hwcompress: search."""
