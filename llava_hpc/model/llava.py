"""The LLaVA model: a frozen vision tower, a projector, and a causal language model.

Names follow the paper and transformers' modeling_llava: `vision_tower`, `multi_modal_projector`,
`language_model`. Each image has ONE placeholder id in `input_ids`; at embedding time the placeholder is
replaced by the image's N projected patch embeddings (labels -100 there), then the sequences are re-padded
(right for training, left for generation) and truncated to `max_length`.

Images come either as `pixel_values` (through the vision tower) or as precomputed `image_features`
([num_images, N, vision_hidden], e.g. fp16 from the Parquet shards): CLIP is frozen in both stages, so the
training jobs need no tower at all (`vision_tower=None`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llava_hpc.data.templates import IGNORE_INDEX
from llava_hpc.rundir import atomic_path

PROJECTORS = ("linear", "mlp2x_gelu")


class LlavaMultiModalProjector(nn.Module):
    """`linear`: one Linear (LLaVA v1, the seed study). `mlp2x_gelu`: Linear, GELU, Linear (LLaVA v1.5).

    `standardize_features` (not in the reference) scales each feature dimension to mean 0, std 1 over the training
    images before linear_1 (`feature_mean`/`feature_std`, set by stage 1 from the features). A frozen tower's
    dimensions can differ 10x in scale, which a small-batch stage 1 learns slowly around; the scaling is affine, so
    export folds it into linear_1 (`folded_linear_1`) and the transformers model needs nothing new.
    """

    def __init__(self, projector_type: str, vision_hidden_size: int, text_hidden_size: int,
                 standardize_features: bool = False):
        super().__init__()
        if projector_type not in PROJECTORS:
            raise ValueError(f"unknown projector {projector_type!r}; known: {PROJECTORS}")
        self.projector_type = projector_type
        self.standardize_features = standardize_features
        if standardize_features:
            self.register_buffer("feature_mean", torch.zeros(vision_hidden_size))
            self.register_buffer("feature_std", torch.ones(vision_hidden_size))
        self.linear_1 = nn.Linear(vision_hidden_size, text_hidden_size)
        if projector_type == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        if self.standardize_features:
            image_features = (image_features - self.feature_mean) / self.feature_std
        hidden_states = self.linear_1(image_features)
        if self.projector_type == "mlp2x_gelu":
            hidden_states = self.linear_2(self.act(hidden_states))
        return hidden_states

    def set_feature_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if not self.standardize_features:
            raise ValueError("this projector was built without standardize_features")
        with torch.no_grad():
            self.feature_mean.copy_(mean)
            self.feature_std.copy_(std)

    @torch.no_grad()
    def folded_linear_1(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of linear_1 acting on raw features: W (x - m) / s + b = (W / s) x + (b - (W / s) m)."""
        weight, bias = self.linear_1.weight, self.linear_1.bias
        if not self.standardize_features:
            return weight.clone(), bias.clone()
        # In float64: the folded map then matches the two-step one to float32 rounding.
        scaled = weight.double() / self.feature_std.double()
        folded_bias = bias.double() - scaled @ self.feature_mean.double()
        return scaled.to(weight.dtype), folded_bias.to(bias.dtype)


PROJECTOR_METADATA_KEY = "llava_hpc.projector"


def save_projector(projector: LlavaMultiModalProjector, path: str | os.PathLike) -> None:
    """safetensors with the projector type and sizes in its metadata, written atomically (stage 1's output)."""
    path = Path(path)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in projector.state_dict().items()}
    description = {
        "projector_type": projector.projector_type,
        "vision_hidden_size": projector.linear_1.in_features,
        "text_hidden_size": projector.linear_1.out_features,
        "standardize_features": projector.standardize_features,
    }
    # One key: safetensors writes its metadata map in hash order, so several keys make the bytes differ run to run.
    metadata = {PROJECTOR_METADATA_KEY: json.dumps(description, sort_keys=True)}
    with atomic_path(path) as temporary:  # a crash or a full disk never leaves half a projector behind
        save_file(tensors, temporary, metadata=metadata)


def load_projector(path: str | os.PathLike) -> LlavaMultiModalProjector:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if PROJECTOR_METADATA_KEY in metadata:
            metadata = json.loads(metadata[PROJECTOR_METADATA_KEY])
        if "projector_type" not in metadata:
            raise ValueError(f"{path}: not a projector file (no projector_type in its safetensors metadata)")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    projector = LlavaMultiModalProjector(
        metadata["projector_type"], int(metadata["vision_hidden_size"]), int(metadata["text_hidden_size"]),
        standardize_features=bool(metadata.get("standardize_features", False)),
    )
    projector.load_state_dict(tensors)
    return projector.to(tensors["linear_1.weight"].dtype)


@dataclass
class ImageLayout:
    """The expanded batch (each placeholder replaced by its image's N patches, re-padded, truncated) as indices.

    `source[b, t]` indexes [text embeddings of the batch, flattened; image embeddings, flattened; one zero row for
    padding]; `predicting` holds the flat positions (into [batch * length]) whose next token is labelled, and
    `targets` those labels. Computed on the host from host tensors (`image_layout`), moved with the batch, it lets
    the forward pass splice images and pick the loss positions with no host-device sync."""

    source: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    predicting: torch.Tensor
    targets: torch.Tensor
    num_images: int

    def to(self, device: str | torch.device) -> ImageLayout:
        move = lambda t: t if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return ImageLayout(move(self.source), move(self.attention_mask), move(self.labels), move(self.predicting),
                           move(self.targets), self.num_images)


def image_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None, *,
                 image_token_id: int, num_patches: int, num_images: int, max_length: int | None,
                 padding_side: str) -> ImageLayout:
    """The `ImageLayout` of a batch. Host tensors in, host tensors out (device tensors are copied first: a sync)."""
    input_ids, attention_mask = input_ids.cpu(), attention_mask.cpu()
    labels = labels.cpu() if labels is not None else None
    batch, width = input_ids.shape
    first_image_row = batch * width
    zero_row = first_image_row + num_images * num_patches
    patch_offsets = torch.arange(num_patches)
    sources, row_targets, used = [], [], 0
    for row in range(batch):
        real = attention_mask[row].nonzero().flatten()
        flat, ids = row * width + real, input_ids[row, real]
        row_labels = labels[row, real] if labels is not None else None
        pieces, label_pieces, start = [], [], 0
        for position in (ids == image_token_id).nonzero().flatten().tolist():
            if used >= num_images:
                raise ValueError(f"input_ids hold more image placeholders than the {num_images} images given")
            pieces += [flat[start:position], first_image_row + used * num_patches + patch_offsets]
            if row_labels is not None:
                label_pieces += [row_labels[start:position], torch.full((num_patches,), IGNORE_INDEX)]
            used, start = used + 1, position + 1
        source = torch.cat(pieces + [flat[start:]])
        target = torch.cat(label_pieces + [row_labels[start:]]) if row_labels is not None else None
        if max_length is not None:
            source = source[:max_length]
            target = target[:max_length] if target is not None else None
        sources.append(source)
        row_targets.append(target)
    if used != num_images:
        raise ValueError(f"{num_images} images given but input_ids hold {used} image placeholders")

    length = max(len(source) for source in sources)

    def pad(tensor: torch.Tensor, value: int) -> torch.Tensor:
        missing = length - tensor.shape[0]
        return F.pad(tensor, (missing, 0) if padding_side == "left" else (0, missing), value=value)

    source = torch.stack([pad(s, zero_row) for s in sources])
    mask = torch.stack([pad(torch.ones(len(s), dtype=torch.long), 0) for s in sources])
    if labels is None:
        empty = torch.zeros(0, dtype=torch.long)
        return ImageLayout(source, mask, None, empty, empty, num_images)
    new_labels = torch.stack([pad(t, IGNORE_INDEX) for t in row_targets])
    next_labels = F.pad(new_labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    predicting = (next_labels != IGNORE_INDEX).nonzero().flatten()
    return ImageLayout(source, mask, new_labels, predicting, next_labels[predicting], num_images)


class LlavaForCausalLM(nn.Module):
    def __init__(
        self,
        vision_tower: nn.Module | None,
        multi_modal_projector: LlavaMultiModalProjector,
        language_model: nn.Module,
        image_token_id: int,
        pad_token_id: int,
        num_patches: int,
        max_length: int = 2048,
    ):
        super().__init__()
        self.vision_tower = vision_tower
        self.multi_modal_projector = multi_modal_projector
        self.language_model = language_model
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id
        self.num_patches = num_patches
        self.max_length = max_length

    # ----- images -----

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected patch embeddings [num_images, N, text_hidden] from pixels or from precomputed features."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("pass exactly one of pixel_values and image_features")
        if image_features is None:
            if self.vision_tower is None:
                raise ValueError(
                    "this model has no vision tower (built for training from features): pass image_features"
                )
            image_features = self.vision_tower(pixel_values)
        weight = self.multi_modal_projector.linear_1.weight
        return self.multi_modal_projector(image_features.to(device=weight.device, dtype=weight.dtype))

    def image_layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                     num_images: int, padding_side: str, truncate: bool) -> ImageLayout:
        """Where each position of the expanded batch comes from (see `ImageLayout`), computed on the host."""
        return image_layout(input_ids, attention_mask, labels, image_token_id=self.image_token_id,
                            num_patches=self.num_patches, num_images=num_images,
                            max_length=self.max_length if truncate else None, padding_side=padding_side)

    def merge_image_embeddings(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        padding_side: str,
        truncate: bool,
        layout: ImageLayout | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replace each placeholder by its image's N embeddings; re-pad to the longest sequence on `padding_side`.

        One gather from [text embeddings; image embeddings; a zero row] by the layout's indices: with a layout
        computed on the host (the training collator's), nothing here waits for the device."""
        text_embeds = self.language_model.get_input_embeddings()(input_ids)
        hidden = text_embeds.shape[-1]
        if image_embeds is None:
            image_embeds = text_embeds.new_zeros(0, self.num_patches, hidden)
        if layout is None:
            layout = self.image_layout(input_ids, attention_mask, labels, image_embeds.shape[0], padding_side, truncate)
        elif layout.num_images != image_embeds.shape[0]:
            raise ValueError(f"{image_embeds.shape[0]} images given but input_ids hold {layout.num_images} image placeholders")
        layout = layout.to(text_embeds.device)
        table = torch.cat([text_embeds.reshape(-1, hidden), image_embeds.reshape(-1, hidden).to(text_embeds.dtype),
                           text_embeds.new_zeros(1, hidden)])
        inputs_embeds = table.index_select(0, layout.source.flatten()).view(*layout.source.shape, hidden)
        return inputs_embeds, layout.attention_mask.to(attention_mask.dtype), layout.labels

    # ----- training and scoring -----

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        layout: ImageLayout | None = None,
        **language_model_kwargs,
    ):
        """Without `labels`: the language model's output (logits over the expanded sequence). With `labels`: an output
        whose `.loss` is the mean next-token cross-entropy over the labelled tokens, and no logits: the output head
        runs only where a label is predicted, not over image patches, prompts and padding (most of the sequence)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pixel_values is None and image_features is None:
            # A text-only batch still runs the projector, on zero images, and keeps it in the graph: under
            # ZeRO-3 (and DDP) a rank that skips a module's forward or backward hangs the other ranks.
            vision_hidden = self.multi_modal_projector.linear_1.in_features
            image_features = torch.zeros(0, self.num_patches, vision_hidden, device=input_ids.device)
        image_embeds = self.get_image_features(pixel_values, image_features)
        if layout is None and labels is not None:
            layout = self.image_layout(input_ids, attention_mask, labels, image_embeds.shape[0], "right", truncate=True)
        if layout is not None:
            layout = layout.to(input_ids.device)  # once: a no-op for a batch already moved with its layout
        inputs_embeds, attention_mask, labels = self.merge_image_embeddings(
            input_ids, attention_mask, labels, image_embeds, padding_side="right", truncate=True, layout=layout
        )
        if image_embeds.shape[0] == 0:
            inputs_embeds = inputs_embeds + image_embeds.sum()  # exactly 0, with the projector in the graph
        # Positions count real tokens only, so a left-padded batch scores like its unpadded rows.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        inputs = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False, **language_model_kwargs)
        if labels is None:
            return self.language_model(**inputs)
        # The sequences are right-padded: under the causal mask no real position sees a pad, and real positions
        # are 0..n-1 anyway, so neither the padding mask nor position ids change anything that is scored. Without
        # them transformers makes no host-device sync per micro-batch (`padding_mask.all()` to pick its attention
        # path, a packed-sequence check on position ids).
        inputs.update(attention_mask=None, position_ids=None)
        hidden_states = self.language_model.get_decoder()(**inputs).last_hidden_state
        return self.labelled_loss(hidden_states, layout)

    def labelled_loss(self, hidden_states: torch.Tensor, layout: ImageLayout):
        """transformers' causal-LM loss (position t predicts label t+1, mean over labels != -100), with the output
        head applied to the predicting positions only (from the layout: no device sync to find them). Calling the
        head module (not its weight) keeps DeepSpeed ZeRO-3's gather hooks and tied embeddings working."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        predicting = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, layout.predicting)
        logits = self.language_model.get_output_embeddings()(predicting)
        return CausalLMOutputWithPast(loss=F.cross_entropy(logits.float(), layout.targets), logits=None)

    # ----- generation -----

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: list[int] | None = None,
    ) -> torch.Tensor:
        """New tokens only, [batch, <= max_new_tokens], pad-filled after each row stops. Greedy at temperature 0.

        The spliced prompts are left-padded, so transformers' generate (KV cache, positions from the mask)
        continues every row from its last real token."""
        from transformers import GenerationConfig

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_embeds = None
        if pixel_values is not None or image_features is not None:
            image_embeds = self.get_image_features(pixel_values, image_features)
        inputs_embeds, attention_mask, _ = self.merge_image_embeddings(
            input_ids, attention_mask, None, image_embeds, padding_side="left", truncate=False
        )
        sampling = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=0 if sampling else None,  # 0, not None: None means "unset" and becomes transformers' top_k=50
            eos_token_id=stop_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        # transformers 5 fills every field the passed config leaves unset from the LLM's own generation_config
        # (Llama 3.2 Instruct ships do_sample=True, temperature=0.6, top_p=0.9; others a repetition penalty): set it
        # aside for the call, keeping only its special tokens, so the pipeline's settings alone decide.
        shipped = self.language_model.generation_config
        self.language_model.generation_config = GenerationConfig(
            bos_token_id=shipped.bos_token_id, eos_token_id=shipped.eos_token_id, pad_token_id=shipped.pad_token_id
        )
        try:
            return self.language_model.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, generation_config=config
            )
        finally:
            self.language_model.generation_config = shipped

    # ----- what trains -----

    def freeze_language_model(self, frozen: bool = True) -> None:
        """Stage 1 trains the projector only; stage 2 trains projector and LLM. The vision tower never trains."""
        self.language_model.requires_grad_(not frozen)
        self.multi_modal_projector.requires_grad_(True)

    def gradient_checkpointing_enable(self) -> None:
        # Non-reentrant checkpointing: with frozen embeddings (stage 1) the blocks' inputs need not require
        # grad, which reentrant checkpointing insists on ("element 0 of tensors does not require grad").
        non_reentrant = {"use_reentrant": False}
        if hasattr(self.language_model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
            self.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
        else:
            self.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
