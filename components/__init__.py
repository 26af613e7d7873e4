"""components: see README."""
