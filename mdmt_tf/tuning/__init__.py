"""Keras Tuner searches over the MDMT models (standalone `mdmt tune` and the pipeline's Tuner)."""
