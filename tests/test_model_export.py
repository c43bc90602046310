"""Export to transformers' Llava format: loads with no project code, same logits, same greedy answers."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava_hpc.data.datasets import Collator, ImageConversationDataset
from llava_hpc.data.templates import ConversationTemplate
from llava_hpc.model.builders import LlavaSpec, LLMSpec, build_llava
from llava_hpc.model.export import SIDECAR, chat, export_llava, load_exported
from llava_hpc.model.vision import VisionTowerSpec
from llava_hpc.synthetic import SyntheticSpec, SyntheticWorld

WORLD = SyntheticWorld(
    SyntheticSpec(n_pretrain=8, n_instruct=64, n_bench=4, instruct_categories=("colour",), bench_categories=("colour",))
)
LLM = LLMSpec(vocabulary=WORLD.vocabulary())


def hf_recipe_inputs(processor, image, question):
    """transformers' standard recipe, as a user of the exported directory would write it."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


@pytest.mark.parametrize(
    "projector, template, aspect, standardize",
    [("linear", "chat_template", "crop", False), ("mlp2x_gelu", "vicuna_v1", "crop", False),
     ("linear", "vicuna_v1", "pad", False), ("linear", "chat_template", "crop", True),
     ("mlp2x_gelu", "chat_template", "crop", True)],
)
def test_exported_transformers_model_gives_the_same_logits(tmp_path, projector, template, aspect, standardize):
    spec = LlavaSpec(vision=VisionTowerSpec(image_aspect_ratio=aspect), llm=LLM, projector=projector,
                     standardize_features=standardize)
    model, tokenizer = build_llava(spec)
    model.eval()
    with torch.no_grad():  # a trained-looking projector, not the init's small weights
        for parameter in model.multi_modal_projector.parameters():
            parameter.normal_(0.0, 0.3)
    if standardize:  # folded into linear_1 on export: transformers' model has no such step
        hidden = model.multi_modal_projector.linear_1.in_features
        model.multi_modal_projector.set_feature_statistics(torch.randn(hidden), torch.rand(hidden) * 3 + 0.25)
    export_llava(model, tokenizer, model.vision_tower.image_processor, tmp_path / "model", template)

    hf_model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "model").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "model")
    image = WORLD.image("bench", 0).crop((0, 0, 64, 40)) if aspect == "pad" else WORLD.image("bench", 0)
    question = WORLD.bench_questions()[0]["text"]
    inputs = hf_recipe_inputs(processor, image, question)

    conversation = ConversationTemplate(template, tokenizer)
    input_ids = torch.tensor([conversation.prompt_ids(question)])
    pixel_values = model.vision_tower.preprocess([image])
    assert torch.equal(pixel_values, inputs["pixel_values"])
    expanded = inputs["input_ids"][0].tolist()
    assert expanded.count(model.image_token_id) == model.num_patches
    assert len(expanded) == input_ids.shape[1] + model.num_patches - 1
    with torch.no_grad():
        ours = model(input_ids, pixel_values=pixel_values).logits
        theirs = hf_model(**inputs).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-5

    loaded, _, _, loaded_template = load_exported(tmp_path / "model")
    assert loaded_template.name == template
    with torch.no_grad():
        again = loaded(input_ids, pixel_values=loaded.vision_tower.preprocess([image])).logits
    assert (again - ours).abs().max() < 1e-5


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    """A tiny model trained for a few seconds on colour questions, so its greedy answers are real words."""
    torch.manual_seed(0)
    model, tokenizer = build_llava(LlavaSpec(llm=LLM))
    template = ConversationTemplate("chat_template", tokenizer)
    dataset = ImageConversationDataset(
        WORLD.records("instruct"), template, model.vision_tower.preprocess, WORLD.load_image, model.num_patches, 256
    )
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=16, collate_fn=Collator(tokenizer.pad_token_id)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(24):
        loss = model(**batches[step % len(batches)].model_inputs()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    directory = tmp_path_factory.mktemp("export") / "model"
    export_llava(model, tokenizer, model.vision_tower.image_processor, directory, "chat_template")
    return directory


def test_processor_recipe_and_project_chat_give_the_same_greedy_answer(trained_export, tmp_path):
    hf_model = LlavaForConditionalGeneration.from_pretrained(trained_export).eval()
    processor = AutoProcessor.from_pretrained(trained_export)
    for question in WORLD.bench_questions():
        image = WORLD.load_image(question["image"])
        inputs = hf_recipe_inputs(processor, image, question["text"])
        generated = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)
        theirs = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        path = tmp_path / f"{question['question_id']}.png"
        image.save(path)
        ours = chat(trained_export, path, question["text"], temperature=0.0, max_new_tokens=8)
        assert ours and ours == theirs


def test_exported_directory_layout(trained_export):
    sidecar = json.loads((trained_export / SIDECAR).read_text())
    assert sidecar == {"template": "chat_template", "projector_type": "linear", "max_length": 2048}
    config = json.loads((trained_export / "config.json").read_text())
    assert config["model_type"] == "llava" and config["projector_hidden_act"] == "linear"
    generation = json.loads((trained_export / "generation_config.json").read_text())
    assert generation["eos_token_id"] is not None
    assert (trained_export / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (trained_export / "processor_config.json").read_text()
    )


def test_export_and_chat_errors(tmp_path, trained_export):
    headless, tokenizer = build_llava(LlavaSpec(llm=LLM), with_vision_tower=False)
    with pytest.raises(ValueError, match="vision tower"):
        export_llava(headless, tokenizer, None, tmp_path / "out", "chat_template")
    with pytest.raises(FileNotFoundError, match="not written by"):
        load_exported(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        chat(trained_export, tmp_path / "missing.png", "What colour?")
    assert isinstance(chat(trained_export, Image.new("RGB", (64, 64)), "What colour?", max_new_tokens=2), str)
