"""kdfast's package. No compiler runs at install: the native sources in csrc/ ship inside the package (as kdfast/csrc)
and are JIT-built on first use (kdfast/native_build.py); the benchmark scripts ship as kdfast/benchmarks, so that
`kdfast bench` and `kdfast profile` work from an install too."""

from setuptools import setup

setup(
    name="kdfast",
    version="0.1.0",
    description="Fused knowledge-distillation losses for large-vocabulary language models",
    python_requires=">=3.9",
    packages=["kdfast", "kdfast.backends", "kdfast.demo", "kdfast.integrations", "kdfast.kernels", "kdfast.csrc",
              "kdfast.benchmarks", "kdfast.teacher_cache"],
    # kernels/, csrc/ and benchmarks/ sit at the repository root (project layout) but install inside kdfast.
    package_dir={"kdfast": "kdfast", "kdfast.kernels": "kernels", "kdfast.csrc": "csrc",
                 "kdfast.benchmarks": "benchmarks"},
    package_data={"kdfast.csrc": ["common/*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.cpp",
                                  "cuda/*.h"],
                  "kdfast.benchmarks": ["*.sh"]},
    # ninja drives the JIT build of the native kernels; the loss itself needs nothing else.
    install_requires=["torch>=2.4", "ninja"],
    extras_require={
        "triton": ["triton>=3.0"],
        # `kdfast bench` / `kdfast profile`: tables and plots.
        "bench": ["rich>=13", "matplotlib>=3.7"],
        # The trainer integrations, `kdfast distill` and `kdfast teacher-cache` (tokenizers comes with transformers;
        # safetensors holds the teacher cache's shards; requests asks a served teacher; datasets reads and writes the
        # peers' top-k datasets).
        "integrations": ["transformers>=4.44", "trl>=0.12", "rich>=13", "matplotlib>=3.7", "safetensors>=0.4",
                         "requests>=2.28", "datasets>=2.18"],
        # liger-kernel: the side-by-side benchmarks; peft: the LoRA-student tests; deepspeed: ZeRO-3 on 2 CPU ranks;
        # pytest-xdist: `make test` runs the suite on two workers (3.8: --no-loadscope-reorder, tests/file_order.py).
        "dev": ["pytest>=8", "pytest-xdist>=3.8", "hypothesis>=6", "ruff>=0.6", "triton>=3.0", "trl>=0.12",
                "transformers>=4.44", "liger-kernel>=0.5", "rich>=13", "matplotlib>=3.7", "peft>=0.13",
                "safetensors>=0.4", "datasets>=2.18", "deepspeed>=0.16", "requests>=2.28"],
    },
    entry_points={"console_scripts": ["kdfast = kdfast.cli:main"]},
)
