"""Load any Hugging Face causal LM + tokenizer; build tiny MoE presets for CPU work.

A preset is materialised once as a real save_pretrained directory (model + tokenizer), cached per
name and seed, so every later stage loads it exactly as it would load a real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from tidal.config import ModelConfig, load_config

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT]
CHAT_TEMPLATE = (
    # Tools as Qwen3's template renders them, in plain text (the presets' vocabulary has no token for
    # them): each function's JSON schema on a line, calls as <tool_call>{"name", "arguments"}</tool_call>
    # (`tidal.rollout.tools.HermesParser` reads them back), results as <tool_response>...</tool_response>.
    "{% if tools %}# Tools\n{% for t in tools %}{{ (t['function'] if t['function'] is defined else t) | tojson }}\n"
    "{% endfor %}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] or '' }}"
    "{% for c in m['tool_calls'] or [] %}{% set f = c['function'] if c['function'] is defined else c %}"
    '<tool_call>{"name": "{{ f[\'name\'] }}", "arguments": '
    "{{ f['arguments'] if f['arguments'] is string else f['arguments'] | tojson }}}</tool_call>{% endfor %}<eos>"
    "{% elif m['role'] == 'tool' %}<tool_response>{{ m['content'] }}</tool_response>"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, built in-process with `tokenizers`.

    Character level suits the arithmetic task (one digit, one token) and needs no training data.
    """
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _moe_common(vocab_size: int, tok: PreTrainedTokenizerBase) -> dict:
    return dict(
        vocab_size=vocab_size,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        # As long as the default rollout.max_context_tokens, so that the defaults of every token limit
        # fit a preset. Rotary positions have no weights: the same seed gives the same model at 512.
        max_position_embeddings=4096,
        initializer_range=0.02,
    )


def preset_config(name: str, tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    """Model config of a tiny MoE preset (a few hundred thousand parameters, CPU friendly). One branch
    per preset, side by side, so that their architectures read as a table (hence its length)."""
    common = _moe_common(len(tok), tok)
    if name == "tiny-qwen3-moe":
        return AutoConfig.for_model(
            "qwen3_moe",
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            router_aux_loss_coef=0.01,
            **common,
        )
    if name == "tiny-glm4-moe":
        # QK-norm as zai-org/GLM-4.5 (use_qk_norm; GLM-4.5-Air has none). Without it the quickstart SFT (lr 3e-3)
        # took >800 and 700 steps to 30% held-out accuracy on seeds 0, 1; with it 470 and 470, as qwen3 (450, 400).
        # The real models' qkv bias (attention_bias) is left out: with it 690 and 850 (bench/glm_presets.py).
        return AutoConfig.for_model(
            "glm4_moe",
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            partial_rotary_factor=0.5,
            use_qk_norm=True,
            **common,
        )
    if name == "tiny-glm5-moe":
        return AutoConfig.for_model(
            "glm_moe_dsa",
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=64,
            kv_lora_rank=32,
            qk_rope_head_dim=16,
            qk_nope_head_dim=32,
            v_head_dim=32,
            head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            index_topk=64,
            index_head_dim=32,
            index_n_heads=4,
            **common,
        )
    raise ValueError(f"unknown model preset {name!r}")


def cache_root() -> Path:
    return Path(os.environ.get("TIDAL_CACHE", Path.home() / ".cache" / "tidal"))


def materialize_preset(name: str, seed: int = 0, root: Path | None = None) -> Path:
    """Build preset `name` with init seed `seed` and save it (model + tokenizer); return its directory."""
    tok = build_char_tokenizer()
    config = preset_config(name, tok)
    digest = hashlib.sha256(
        json.dumps([config.to_dict(), tok.get_vocab(), CHAT_TEMPLATE], sort_keys=True, default=str).encode()
    ).hexdigest()[:10]
    out = (root or cache_root() / "presets") / f"{name}-s{seed}-{digest}"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():  # another process built the same preset meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    log.info("built preset %s (%.2fM params) at %s", name, model.num_parameters() / 1e6, out)
    return out


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """The save_pretrained directory that `cfg` names (materialising a preset if needed); of an SFT
    warm start, its cached checkpoint, which `tidal.stages.warm_start.resolve_policy_dir` trains."""
    if cfg.path is not None:
        return Path(cfg.path)
    if cfg.sft_warm_start is not None:
        return warm_start_dir(cfg.sft_warm_start) / "checkpoint"
    assert cfg.preset is not None
    return materialize_preset(cfg.preset, cfg.init_seed)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        # Many causal LMs ship without a pad token; padding is always masked, so eos is safe.
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
) -> PreTrainedModel:
    """The causal LM in `path`, with tidal.model.patches' fixes applied.

    `attn_implementation` None takes transformers' own default, `sdpa` where the model class supports
    it (`_supports_sdpa`), else `eager` (`PreTrainedModel.get_correct_attn_implementation`); passed
    explicitly, None also overrides an `attn_implementation` written in the checkpoint's config.json.
    """
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=attn_implementation)
    from tidal.model.patches import apply_model_fixes

    apply_model_fixes(model)
    log.debug("loaded %s with attention %s", path, model.config._attn_implementation)
    return model


# ---------------------------------------------------------------------- an SFT warm start's place

_WEIGHT_KEYS = ("seed", "model", "data", "trainer", "sft")


def warm_start_dir(sft_config: str | Path) -> Path:
    """The cached SFT run directory of `sft_config` (it may not exist yet): named by a digest of the
    settings that shape its weights, as set away from their defaults, so that a key added to tidal
    later (at its default) leaves every cached warm start in place; changing a default does not
    retrain one either (`tidal sft` it again, or clear the cache, to have it follow)."""
    cfg = load_config(sft_config)
    tree = cfg.model_dump(mode="json", exclude_defaults=True)
    chosen = {k: tree.get(k, {}) for k in _WEIGHT_KEYS}
    digest = hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()
    return cache_root() / "warm_start" / f"{Path(sft_config).stem}-{digest[:10]}"


def tokenizer_dir(cfg: ModelConfig) -> Path:
    """A directory with the policy's tokenizer, without training a warm start that is not cached yet
    (an SFT run keeps its base model's tokenizer): what start-up checks of the data need."""
    if cfg.sft_warm_start is None:
        return resolve_model_dir(cfg)
    cached = warm_start_dir(cfg.sft_warm_start) / "checkpoint"
    if (cached / "tokenizer_config.json").is_file():
        return cached
    return resolve_model_dir(load_config(cfg.sft_warm_start).model)
