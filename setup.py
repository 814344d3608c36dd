"""Pure-Python install: the native code in csrc/ is JIT-built on first use (kdfast/native_build.py)."""

from setuptools import setup

setup(
    name="kdfast",
    version="0.1.0",
    description="Fused knowledge-distillation losses for large-vocabulary language models",
    python_requires=">=3.9",
    packages=["kdfast", "kdfast.backends", "kdfast.demo", "kdfast.integrations", "kdfast.kernels"],
    # kernels/ sits at the repository root (project layout) but installs as kdfast.kernels.
    package_dir={"kdfast": "kdfast", "kdfast.kernels": "kernels"},
    install_requires=["torch>=2.4", "rich>=13"],
    extras_require={
        "triton": ["triton>=3.0"],
        # The trainer integrations and `kdfast distill` (tokenizers comes with transformers).
        "integrations": ["transformers>=4.44", "trl>=0.12", "matplotlib>=3.7"],
        # liger-kernel and matplotlib: the side-by-side benchmarks and the plots; peft: the LoRA-student tests.
        "dev": ["pytest>=8", "hypothesis>=6", "ruff>=0.6", "ninja", "triton>=3.0", "trl>=0.12",
                "transformers>=4.44", "liger-kernel>=0.5", "matplotlib>=3.7", "peft>=0.13"],
    },
    entry_points={"console_scripts": ["kdfast = kdfast.cli:main"]},
)
