"""What a LLaVA model is built from: plain frozen dataclasses, declared once.

The builders (`model/vision.py`, `model/builders.py`) take these and nothing else; the pipeline file validates its
`[model.tiny_vision]` and `[model.tiny_llm]` tables straight into `TinyVisionSpec` and `TinyLLMSpec` (config.py uses
them as field types), so a setting and its default live here alone. This module imports nothing but the standard
library: `llava-hpc --help` and `status` load it with the config, and must not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TINY = "tiny"


@dataclass(frozen=True)
class TinyVisionSpec:
    """A randomly initialised CLIP tower small enough for CPU tests and the demo.

    `position_embedding_std` re-initialises the position embeddings: with the default (0.02) a random
    frozen tower keeps little of an object's position; 0.15 keeps both colour and position
    (notes/synthetic-world.md).
    """

    # A table of the pipeline file (pydantic validates it as a field type): an unknown key is an error.
    __pydantic_config__ = {"extra": "forbid"}

    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 64
    intermediate_size: int = 128
    layers: int = 2
    heads: int = 2
    position_embedding_std: float = 0.15
    seed: int = 0


@dataclass(frozen=True)
class VisionTowerSpec:
    name: str = TINY  # "tiny", a Hugging Face id, or a local directory
    select_layer: int = -2
    image_aspect_ratio: str = "crop"  # "crop" (LLaVA v1: resize + centre crop) or "pad" (v1.5: pad to square first)
    tiny: TinyVisionSpec = field(default_factory=TinyVisionSpec)


@dataclass(frozen=True)
class TinyLLMSpec:
    """A from-scratch Llama small enough for CPU tests and the demo (notes/synthetic-world.md).

    intermediate_size 256 is what every pipeline (the demo's included) has trained with."""

    # A table of the pipeline file (pydantic validates it as a field type): an unknown key is an error.
    __pydantic_config__ = {"extra": "forbid"}

    hidden_size: int = 128
    intermediate_size: int = 256
    layers: int = 2
    heads: int = 4
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    seed: int = 0


@dataclass(frozen=True)
class LLMSpec:
    name: str = TINY  # "tiny", "smollm2", a Hugging Face id, or a local directory
    tiny: TinyLLMSpec = field(default_factory=TinyLLMSpec)
    # The tiny tokenizer's words (lowercased), from the data (e.g. SyntheticWorld.vocabulary()), not a setting: other
    # LLMs bring their own tokenizer and ignore it.
    vocabulary: tuple[str, ...] = ()
    attn_implementation: str | None = None  # e.g. "eager", "sdpa"; None: default_attn_implementation(device)

    def __post_init__(self) -> None:
        object.__setattr__(self, "vocabulary", tuple(self.vocabulary))  # TOML/JSON give lists


@dataclass(frozen=True)
class LlavaSpec:
    vision: VisionTowerSpec = field(default_factory=VisionTowerSpec)
    llm: LLMSpec = field(default_factory=LLMSpec)
    projector: str = "linear"  # "linear" (v1) or "mlp2x_gelu" (v1.5)
    max_length: int = 2048
    standardize_features: bool = False  # see LlavaMultiModalProjector
