"""mdmt_tf: multi-domain multi-task recommendation on TensorFlow / Keras 3.

The library (this package) is pure Keras 3 + tf.data and never imports TFX; the TFX
module code lives in `components/`, the pipeline in `pipeline/`, serving in `serving/`.
Data flows one way: spec -> data -> preprocessing -> model -> training -> export.
"""
__version__ = "0.1.0"
