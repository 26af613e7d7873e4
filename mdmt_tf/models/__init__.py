"""MDMT models: M3oE, STEM-Net and the baselines, built by name from a ModelConfig."""
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.models.registry import MODELS, ModelConfig, build_model, model_names
from mdmt_tf.models.schema import FeatureSchema

__all__ = ["MDMTModel", "MODELS", "ModelConfig", "FeatureSchema", "build_model", "model_names"]
