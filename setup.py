"""moe_vlm: sparse Mixture-of-Experts vision-language models (MoE-LLaVA) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="moe_vlm",
    version="0.1.0",
    description="MoE-LLaVA style sparse vision-language models in JAX/Flax for TPU pods",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["moe_vlm", "moe_vlm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9",
        "transformers>=5.0",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "pillow>=10",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        # StableLM-2's Arcade100k and Qwen-1's tokenizers (tiktoken files), read without
        # their remote code (moe_vlm/data/tiktoken_tokenizer.py).
        "tiktoken>=0.7",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # CPU PyTorch for parity tests and export checks (2.13.0 is on the machine's disk).
        "torch": ["torch==2.13.0", "safetensors>=0.4"],
        # gs:// workdirs: etils.epath reaches GCS through fsspec/gcsfs (without TensorFlow),
        # tensorboardX through google-cloud-storage (launch/setup.sh installs this extra).
        "gcs": ["gcsfs>=2025.3", "google-cloud-storage>=2.14"],
        "dev": ["torch==2.13.0", "safetensors>=0.4", "pytest>=8", "portpicker>=1.6",
                "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6",
                # tests/test_gcs.py: gs:// workdirs against a local GCS emulator
                "gcsfs>=2025.3", "google-cloud-storage>=2.14", "gcp-storage-emulator>=2024.8"],
    },
    entry_points={"console_scripts": ["moe-vlm=moe_vlm.cli:main"]},
)
