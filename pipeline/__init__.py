"""pipeline: see README."""
