import os

from setuptools import find_packages, setup

BUILD_EXT_ENV = "SSM_KERNELS_BUILD_EXT"


def extension_modules():
    """csrc/ as the torch extension ssm_kernels._C, only when $SSM_KERNELS_BUILD_EXT=1: a plain
    `pip install` compiles nothing. The CPU kernels always; the CUDA kernels too where nvcc and a
    CUDA build of torch are present (a message says which)."""
    if os.environ.get(BUILD_EXT_ENV, "0") in ("", "0"):
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError as e:
        raise SystemExit(f"{BUILD_EXT_ENV}=1: building csrc/ needs torch importable at build time; install torch "
                         f"first and build with `pip install -e . --no-build-isolation` ({e})")
    import shutil
    import subprocess
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise SystemExit(f"{BUILD_EXT_ENV}=1: no C++ compiler found ({compiler!r} is not on PATH); install g++ "
                         "(or set CXX), or build without the extension")
    try:
        subprocess.run([compiler, "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"{BUILD_EXT_ENV}=1: the C++ compiler {compiler!r} does not run: {e}")
    here = os.path.dirname(os.path.abspath(__file__))
    sources = ["csrc/extension.cpp"] + [f"csrc/cpu/scan_cpu_{isa}.cpp" for isa in ("generic", "avx2", "avx512")]
    # -fno-trapping-math lets the vectorizer turn the exp's range checks into blends (results and
    # inf/NaN handling unchanged); -ffp-contract=fast gives FMAs (ISO C++ mode turns them off).
    # -fopenmp: at::parallel_for runs its loop through OpenMP pragmas in torch's headers, serially without it.
    cxx = ["-O3", "-fno-trapping-math", "-ffp-contract=fast", "-fopenmp"]
    include_dirs = [os.path.join(here, "csrc"), os.path.join(here, "csrc", "cuda")]
    cuda_missing = _cuda_missing(cpp_extension)
    if cuda_missing:
        print(f"ssm_kernels: building the CPU kernels of csrc/ only ({cuda_missing})")
        ext = cpp_extension.CppExtension("ssm_kernels._C", sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    else:
        # the time-parallel CUDA kernels of csrc/cuda/ too: sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST
        # names others (torch's BuildExtension reads it then)
        print("ssm_kernels: building the CPU and the CUDA kernels of csrc/")
        archs = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else [
            f"-gencode=arch=compute_{a},code=sm_{a}" for a in (80, 90)]
        ext = cpp_extension.CUDAExtension(
            "ssm_kernels._C", sources + ["csrc/cuda/scan_cuda.cu"], include_dirs=include_dirs,
            define_macros=[("SSM_KERNELS_WITH_CUDA", None)], extra_link_args=["-fopenmp"],
            extra_compile_args={"cxx": cxx,
                                "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", *archs]})
    return [ext], {"build_ext": cpp_extension.BuildExtension}


def _cuda_missing(cpp_extension):
    """None when the CUDA part of csrc/ can be built here, else why not."""
    import shutil
    import torch
    if torch.version.cuda is None:
        return "torch is a CPU build"
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc was not found (set CUDA_HOME)"
    return None


ext_modules, cmdclass = extension_modules()
# The transformers releases whose Mamba modules ssm_kernels.integrations is tested with (5.24, 5.25):
# a new minor release changes them (5.25 did), so the range opens only once a release is tested.
TRANSFORMERS = "transformers>=5.24,<5.26"

setup(
    name="ssm_kernels",
    version="0.1.0",
    description="Triton selective-scan kernels for Mamba-style SSMs, with muP-SSM width multipliers",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ssm_kernels", "ssm_kernels.*"]),
    python_requires=">=3.9",
    # Pure Python + Triton unless $SSM_KERNELS_BUILD_EXT=1 (csrc/, see extension_modules): torch is
    # not pinned here (CPU and CUDA builds differ per machine); triton >= 3.2 for tl.flip along any
    # dim, kernels avoid newer features; numpy because Triton's interpreter (the kernels on the CPU)
    # needs it and triton does not declare it; tqdm for the progress bars of long runs.
    install_requires=["torch>=2.4", "triton>=3.2", "numpy", "tqdm"],
    extras_require={
        # matplotlib draws `python -m ssm_kernels.bench plot`; the tests draw one.
        "plot": ["matplotlib>=3.5"],
        # setuptools >= 70.1 builds csrc/ editable without the wheel package (README's test command
        # builds it with --no-build-isolation, so the venv's own setuptools is the one that runs).
        # transformers: the integration tests; einops: mamba_ssm's modules, which README's test
        # command installs without its CUDA build. The exact versions CI uses: .ci/constraints.txt.
        "test": ["pytest>=7", "pytest-benchmark>=4", "matplotlib>=3.5", "setuptools>=70.1", TRANSFORMERS, "einops"],
        "transformers": [TRANSFORMERS],
        "conv": ["causal-conv1d>=1.4"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
