from setuptools import find_packages, setup

setup(
    name="ssm_kernels",
    version="0.1.0",
    description="Triton selective-scan kernels for Mamba-style SSMs, with muP-SSM width multipliers",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ssm_kernels", "ssm_kernels.*"]),
    python_requires=">=3.9",
    # Pure Python + Triton: no compiler step. torch is not pinned here (CPU and CUDA builds
    # differ per machine); triton >= 3.2 for tl.flip along any dim, kernels avoid newer features;
    # numpy because Triton's interpreter (the kernels on the CPU) needs it and triton does not
    # declare it; tqdm for the progress bars of long runs (profile, coord-check).
    install_requires=["torch>=2.4", "triton>=3.2", "numpy", "tqdm"],
    extras_require={
        # matplotlib draws `python -m ssm_kernels.bench plot`; the tests draw one.
        "plot": ["matplotlib>=3.5"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "matplotlib>=3.5"],
        "conv": ["causal-conv1d>=1.4"],
    },
)
