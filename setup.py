"""edit_r1_jax: Edit-R1 (verifier-based RL for image editing) in JAX/Flax for TPU pod slices.

Pins are the set that installs together on CPython 3.11 (see shared docs env-notes): jax 0.10.2 and flax 0.12.8
are the newest releases for 3.11, and torch is pinned exactly to the CPU wheel (anything looser pulls CUDA builds).
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "pillow==13.0.0",
    "numpy==2.4.6",
    "protobuf==7.36.2",
    "ml-collections==1.1.0",
    "chex==0.1.92",
    "einops==0.8.2",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
    "matplotlib",
    "absl-py",
]

TEST_REQUIRES = [
    "torch==2.13.0",  # exact: the CPU wheel; never loosen
    "diffusers==0.42.1",
    "peft==0.21.2",        # diffusers' LoRA loader backend (LoRA interchange tests)
    "accelerate==1.15.0",  # needed by peft
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",
    "hypothesis",
    "portpicker==1.6.0",
]

setup(
    name="edit_r1_jax",
    version="0.1.0",
    description="Edit-R1 (reasoning reward model + Flow-GRPO editor training) in JAX/Flax for TPU pod slices",
    packages=find_packages(include=["edit_r1_jax", "edit_r1_jax.*"]),
    package_data={"edit_r1_jax.native": ["*.cc"]},   # native CPU kernels, compiled on first use (native/build.py)
    python_requires=">=3.11,<3.12",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    entry_points={"console_scripts": ["edit-r1-jax=edit_r1_jax.cli:main"]},
)
