"""llava-hpc: train and evaluate LLaVA-style vision-language models on a Slurm cluster."""

__version__ = "0.1.0"

# Where the CLI looks for the pipeline file when --pipeline is not given (here, not in config: --help then needs
# no pydantic).
PIPELINE_ENV = "LLAVA_HPC_PIPELINE"
