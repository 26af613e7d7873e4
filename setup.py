"""mdmt_tf: multi-domain multi-task recommendation on TensorFlow/Keras 3 with a TFX pipeline.

The pinned environment is requirements/lock.txt (installed by `make setup`; a checkout runs
`bin/mdmt`, not an install). This file makes the package installable (`pip install .`) and
provides the `mdmt` command.

Layout when installed: the checkout's top-level `pipeline/`, `serving/` and `components/`
are installed inside the package, as `mdmt_tf.pipeline`, `mdmt_tf.serving` and
`mdmt_tf.components`, so that the only top-level name in site-packages is `mdmt_tf`.
Inside those packages imports are relative; `mdmt_tf` reaches them through
`mdmt_tf._project.project_module`, which finds them in either layout. `scripts/` (set-up,
benchmark helpers such as scripts/bench/torch_reference.py) and `tests/` are not installed.

install_requires lists every distribution the installed code imports, plus tensorboard, which
keras-tuner imports (for a TensorBoard callback) without declaring it; tests/test_package.py
checks the list against the imports.
"""
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
# top-level directories of the checkout installed inside mdmt_tf
NESTED = ("pipeline", "serving", "components")


def packages_in(top: str, name: str) -> list[str]:
    """Every directory under `top` that holds a module, as a package named under `name`
    (with or without __init__.py: a new subdirectory of modules is never left out)."""
    dirs = {path.parent.relative_to(HERE / top) for path in (HERE / top).rglob("*.py")
            if "__pycache__" not in path.parts}
    return sorted(".".join((name, *d.parts)) for d in dirs)


packages = packages_in("mdmt_tf", "mdmt_tf")
for top in NESTED:
    packages += packages_in(top, f"mdmt_tf.{top}")

setup(
    name="mdmt_tf",
    version="0.1.0",
    description="Multi-domain multi-task recommendation (M3oE, STEM-Net, MAMDR, baselines) "
                "on TensorFlow/Keras 3 with a TFX pipeline and TF Serving",
    python_requires=">=3.11,<3.12",
    packages=packages,
    package_dir={f"mdmt_tf.{top}": top for top in NESTED},
    include_package_data=True,
    install_requires=[
        # the TensorFlow / TFX stack (the versions of requirements/requirements.in)
        "tensorflow==2.21.*", "keras>=3.15,<4", "tfx==1.21.0", "ml-pipelines-sdk==1.21.0",
        "tensorflow-transform==1.21.0", "tensorflow-data-validation==1.21.0",
        "tensorflow-model-analysis==0.52.*", "tensorflow-metadata==1.21.*", "ml-metadata==1.21.0",
        "keras-tuner==1.4.8", "tensorboard==2.21.*", "tensorflow-serving-api", "apache-beam==2.77.*",
        # imported directly as well
        "absl-py", "grpcio", "protobuf", "requests", "numpy", "pandas", "matplotlib", "pyyaml",
    ],
    extras_require={"kubeflow": ["kfp>=2.16,<2.17"]},
    entry_points={"console_scripts": ["mdmt=mdmt_tf.cli:main"]},
)
