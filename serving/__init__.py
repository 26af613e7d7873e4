"""serving: see README."""
