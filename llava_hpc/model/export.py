"""Export to transformers' Llava format, load it back, and chat with it.

The exported directory loads with `LlavaForConditionalGeneration.from_pretrained(DIR)` and
`AutoProcessor.from_pretrained(DIR)` and no project code. transformers' projector is always
Linear-act-Linear: a single-Linear projector exports as linear_1 = the trained layer, act = identity
(`projector_hidden_act="linear"`), linear_2 = identity with zero bias, which reproduces it exactly.
The processor carries the Jinja template the model was trained with, so `processor.apply_chat_template`
renders the same prompt as the project. `llava_hpc.json` beside it names that template for `load_exported`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image

from llava_hpc.data.templates import ConversationTemplate
from llava_hpc.model.llava import LlavaForCausalLM, LlavaMultiModalProjector
from llava_hpc.model.vision import VisionTower

SIDECAR = "llava_hpc.json"
# The image processor settings that carry over from the tower's CLIP processor to the exported one.
_IMAGE_PROCESSOR_KEYS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)


def export_llava(
    model: LlavaForCausalLM, tokenizer, image_processor, out_dir: str | os.PathLike, template: str
) -> Path:
    """Write `out_dir` (replacing it) in transformers' Llava format, with processor and generation config."""
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tower = model.vision_tower
    if tower is None:
        raise ValueError("export needs the vision tower: set model.vision_tower = build_vision_tower(spec) first")
    conversation = ConversationTemplate(template, tokenizer)
    projector = model.multi_modal_projector
    language_model = model.language_model
    text_config = language_model.config
    config = LlavaConfig(
        vision_config=tower.model.config,
        text_config=text_config,
        image_token_index=model.image_token_id,
        image_seq_length=model.num_patches,
        projector_hidden_act="linear" if projector.projector_type == "linear" else "gelu",
        vision_feature_layer=tower.select_layer,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    # Built on the meta device, then given the trained modules themselves: no second copy of a 7B model.
    with torch.device("meta"):
        hf_model = LlavaForConditionalGeneration(config)
    hf_model.model.vision_tower = tower.model
    hf_model.model.language_model = getattr(language_model, language_model.base_model_prefix)
    hf_model.lm_head = language_model.get_output_embeddings()
    hf_model.model.multi_modal_projector = _hf_projector(projector, config)
    hf_model.generation_config = GenerationConfig(
        eos_token_id=conversation.stop_token_ids, pad_token_id=model.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )

    exported_image_processor = LlavaImageProcessorPil(
        **{key: getattr(image_processor, key) for key in _IMAGE_PROCESSOR_KEYS},
        do_pad=tower.image_aspect_ratio == "pad",  # v1.5: pad to square with the mean colour, as the tower does
    )
    processor = LlavaProcessor(
        image_processor=exported_image_processor,
        tokenizer=tokenizer,
        patch_size=tower.model.config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, which the "default" strategy drops
        chat_template=conversation.jinja,
    )

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        hf_model.save_pretrained(staging)
        processor.save_pretrained(staging)
        sidecar = {"template": template, "projector_type": projector.projector_type, "max_length": model.max_length}
        (staging / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _hf_projector(projector: LlavaMultiModalProjector, config):
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector as HFProjector

    weight = projector.linear_1.weight
    hf_projector = HFProjector(config).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        weight_1, bias_1 = projector.folded_linear_1()  # standardised features: the scaling folded in
        hf_projector.linear_1.weight.copy_(weight_1)
        hf_projector.linear_1.bias.copy_(bias_1)
        if projector.projector_type == "linear":
            hf_projector.linear_2.weight.copy_(torch.eye(weight.shape[0]))
            hf_projector.linear_2.bias.zero_()
        else:
            hf_projector.linear_2.load_state_dict(projector.linear_2.state_dict())
    return hf_projector


def load_exported(
    model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[LlavaForCausalLM, object, object, ConversationTemplate]:
    """(model, tokenizer, image_processor, template) of a directory written by `export_llava`."""
    from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

    model_dir = Path(model_dir)
    sidecar_path = model_dir / SIDECAR
    if not sidecar_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {SIDECAR}; this directory was not written by `llava-hpc export`")
    sidecar = json.loads(sidecar_path.read_text())
    hf_model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype or "auto").to(device)
    processor = AutoProcessor.from_pretrained(model_dir)
    config = hf_model.config
    hf_projector = hf_model.model.multi_modal_projector
    linear_1, linear_2 = hf_projector.linear_1, hf_projector.linear_2
    projector = LlavaMultiModalProjector(sidecar["projector_type"], linear_1.in_features, linear_1.out_features)
    projector.to(device=linear_1.weight.device, dtype=linear_1.weight.dtype)
    with torch.no_grad():
        if sidecar["projector_type"] == "linear":
            # linear_2 is the identity on export; composing keeps any other affine map exact too.
            projector.linear_1.weight.copy_(linear_2.weight @ linear_1.weight)
            projector.linear_1.bias.copy_(linear_2.weight @ linear_1.bias + linear_2.bias)
        else:
            projector.load_state_dict(hf_projector.state_dict())
    with torch.device("meta"):
        language_model = AutoModelForCausalLM.from_config(config.text_config)
    setattr(language_model, language_model.base_model_prefix, hf_model.model.language_model)
    language_model.lm_head = hf_model.lm_head
    language_model.generation_config = hf_model.generation_config
    # The exported processor already pads to square where the model was trained that way.
    vision_tower = VisionTower(
        hf_model.model.vision_tower, processor.image_processor, config.vision_feature_layer, "crop"
    )
    tokenizer = processor.tokenizer
    model = LlavaForCausalLM(
        vision_tower,
        projector,
        language_model,
        image_token_id=config.image_token_index,
        pad_token_id=hf_model.generation_config.pad_token_id,
        num_patches=config.image_seq_length,
        max_length=sidecar["max_length"],
    )
    model.eval()
    return model, tokenizer, processor.image_processor, ConversationTemplate(sidecar["template"], tokenizer)


def chat(
    model_dir: str | os.PathLike,
    image: str | os.PathLike | Image.Image,
    question: str,
    temperature: float = 0.0,
    max_new_tokens: int = 512,
    top_p: float = 1.0,
    device: str | torch.device = "cpu",
) -> str:
    """One answer from an exported model about one image (`llava-hpc chat`)."""
    model, _, _, template = load_exported(model_dir, device)
    if not isinstance(image, Image.Image):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        image = Image.open(path)
    input_ids = torch.tensor([template.prompt_ids(question)], device=device)
    generated = model.generate(
        input_ids,
        pixel_values=model.vision_tower.preprocess([image]),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_token_ids=template.stop_token_ids,
    )
    return template.decode_answer(generated[0])
