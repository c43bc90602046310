"""llava-hpc: train and evaluate LLaVA-style vision-language models on a Slurm cluster."""

__version__ = "0.1.0"
