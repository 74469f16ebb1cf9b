"""hwcompress: hw_profiles."""
