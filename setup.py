"""mdmt_tf: multi-domain multi-task recommendation on TensorFlow/Keras 3 with a TFX pipeline.

The pinned environment is requirements/lock.txt (installed by `make setup`); this file
makes the package installable (`pip install .`) and provides the `mdmt` command.
"""
from setuptools import find_packages, setup

setup(
    name="mdmt_tf",
    version="0.1.0",
    description="Multi-domain multi-task recommendation (M3oE, STEM-Net, MAMDR, baselines) "
                "on TensorFlow/Keras 3 with a TFX pipeline and TF Serving",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["mdmt_tf", "mdmt_tf.*", "components", "pipeline", "serving"]),
    include_package_data=True,
    install_requires=[
        "tensorflow==2.21.*", "keras>=3.15,<4", "tfx==1.21.0", "tensorflow-transform==1.21.0",
        "keras-tuner==1.4.8", "tensorboard==2.21.*", "tensorflow-serving-api", "keras-rs",
        "pandas", "pyarrow", "matplotlib", "pyyaml",
    ],
    extras_require={"kubeflow": ["kfp>=2.16,<2.17"]},
    entry_points={"console_scripts": ["mdmt=mdmt_tf.cli:main"]},
)
