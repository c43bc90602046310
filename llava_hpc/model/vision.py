"""The frozen CLIP vision tower: pixels -> patch features (layer -2, CLS dropped), as in LLaVA.

The tower is built from plain arguments (a `VisionTowerSpec`, declared in model/specs.py), never from a config file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from llava_hpc.model.specs import TINY, TinyVisionSpec, VisionTowerSpec  # noqa: F401 (TinyVisionSpec: re-exported)


class ModelNotAvailableError(RuntimeError):
    """A model could not be found locally (compute nodes have no internet)."""


def offline_hint(name: str) -> str:
    return (
        f"model {name!r} is not available locally. Compute nodes usually have no internet: on a login node run\n"
        f"    hf download {name}\n"
        f"so it lands in the HF cache shared with the compute nodes (HF_HOME), or point the pipeline at a local directory."
    )


def hf_load_kwargs(name: str) -> dict:
    """Offline unless the user explicitly allows downloads: a job must never hang on a hub it cannot reach."""
    path = Path(name).expanduser()
    if path.is_absolute() or name.startswith("."):
        if not path.is_dir():
            raise ModelNotAvailableError(f"model directory {path} does not exist")
        return {}
    offline = os.environ.get("HF_HUB_OFFLINE", "1") not in ("0", "false", "False")
    return {"local_files_only": offline}


class VisionTower(torch.nn.Module):
    """Wraps a CLIPVisionModel: `forward(pixel_values) -> [B, num_patches, hidden_size]`."""

    def __init__(self, model, image_processor, select_layer: int = -2, image_aspect_ratio: str = "crop"):
        super().__init__()
        self.model = model
        self.image_processor = image_processor
        self.select_layer = select_layer
        self.image_aspect_ratio = image_aspect_ratio
        self.model.requires_grad_(False)
        self.model.eval()

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def num_patches(self) -> int:
        return (self.model.config.image_size // self.model.config.patch_size) ** 2

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        if self.image_aspect_ratio == "pad":
            fill = tuple(int(x * 255) for x in self.image_processor.image_mean)
            images = [pad_to_square(im, fill) for im in images]
        return self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    def train(self, mode: bool = True):
        # The tower is frozen: it never leaves eval mode (no dropout), whatever the caller does.
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        out = self.model(pixel_values.to(device=param.device, dtype=param.dtype), output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, 1:]  # drop CLS


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode if image.mode == "RGB" else "RGB", (side, side), fill)
    canvas.paste(image.convert("RGB"), ((side - width) // 2, (side - height) // 2))
    return canvas


def build_vision_tower(spec: VisionTowerSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> VisionTower:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if spec.name == TINY:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        t = spec.tiny
        config = CLIPVisionConfig(
            image_size=t.image_size,
            patch_size=t.patch_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
        )
        # Same seed -> same weights in every job (features, generate, export), so no file needs to carry them.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed)
            model = CLIPVisionModel(config)
            with torch.no_grad():
                # transformers 5 flattened CLIPVisionModel; 4.x nests it under .vision_model
                getattr(model, "vision_model", model).embeddings.position_embedding.weight.normal_(0.0, t.position_embedding_std)
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": t.image_size}, crop_size={"height": t.image_size, "width": t.image_size}
        )
    else:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        kwargs = hf_load_kwargs(spec.name)
        try:
            model = CLIPVisionModel.from_pretrained(spec.name, torch_dtype=dtype, **kwargs)
            processor = CLIPImageProcessorPil.from_pretrained(spec.name, **kwargs)
        except OSError as exc:
            raise ModelNotAvailableError(offline_hint(spec.name)) from exc
    model.to(device=device, dtype=dtype)
    return VisionTower(model, processor, spec.select_layer, spec.image_aspect_ratio)
