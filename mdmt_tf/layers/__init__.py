"""Small registered Keras 3 layers the MDMT models are composed of."""
from mdmt_tf.layers.cgc import CGC
from mdmt_tf.layers.embedding import FieldEmbedding
from mdmt_tf.layers.experts import ExpertGroup
from mdmt_tf.layers.fusion import Amplitude, Balance
from mdmt_tf.layers.gates import DSelectKGate, GateLogits, SoftmaxGate, aftb_mix, mix
from mdmt_tf.layers.initializers import GroupedGlorotUniform
from mdmt_tf.layers.mlp import MLP
from mdmt_tf.layers.pepnet import EPNet, GateNU, PPNetTowers
from mdmt_tf.layers.star import PartitionedNorm, StarFC
from mdmt_tf.layers.stem import STEMLayer
from mdmt_tf.layers.towers import Towers

__all__ = ["Amplitude", "Balance", "CGC", "DSelectKGate", "EPNet", "ExpertGroup", "FieldEmbedding", "GateLogits",
           "GateNU", "GroupedGlorotUniform", "MLP", "PPNetTowers", "PartitionedNorm", "STEMLayer", "SoftmaxGate",
           "StarFC", "Towers", "aftb_mix", "mix"]
