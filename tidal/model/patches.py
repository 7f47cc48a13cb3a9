"""Fixes applied to models at load time (filled in per architecture).

Each fix names the upstream code it works around, so it can be deleted once transformers fixes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import (
    GlmMoeDsaIndexer,
    apply_rotary_pos_emb_interleave,
)


def apply_model_fixes(model: PreTrainedModel) -> None:
    """Apply known fixes to `model` in place; a no-op for architectures that need none."""
    _fix_glm_moe_dsa_indexer_ties(model)


def _fix_glm_moe_dsa_indexer_ties(model: PreTrainedModel) -> None:
    """Make GLM-5's DSA indexer break score ties by key position, so every path selects the same keys.

    Cause (transformers 5.19.0, models/glm_moe_dsa/modeling_glm_moe_dsa.py, GlmMoeDsaIndexer.forward):

        scores = F.relu(scores)                                                     # line 229
        index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)      # line 233
        return index_scores.topk(topk, dim=-1).indices.to(torch.int32)              # line 242

    A key whose dot product is <= 0 for every indexer head scores exactly 0, so rows hold blocks of
    exact ties (about 2**-index_n_heads of the keys: 6% with the tiny preset's 4 heads, next to none
    with the default 32). `topk` breaks ties in an order that depends on the row length, and rows
    differ in length between cached decoding (the keys seen so far) and a full forward (the whole
    sequence, future keys masked), between a prompt and a longer sequence that starts with it, and
    between a left-padded row and the same sequence alone. Whenever the top-k boundary falls inside
    a tie, the paths attend to different keys, and the log-probs that sampling saw are not those the
    trainer recomputes. The causal and padding masks themselves are correct: masked keys score far
    below every visible key, and stay masked in attention even when picked.

    The fix replaces `topk` by a stable descending sort (earlier key first among equals), which
    selects the same keys however many masked keys follow. It costs a full sort of each score row.
    Near-ties that rounding flips between paths remain possible, as with any hard top-k; in fp32
    none showed in bench/glm5_dsa_mismatch.py (residual ~1e-6). bf16 was not measured.
    Remove it once upstream selects deterministically; tests/integration/test_glm5_dsa.py then passes
    without it.
    """
    indexers = [m for m in model.modules() if isinstance(m, GlmMoeDsaIndexer)]
    if indexers and Version(transformers.__version__) < Version("5.17"):
        # 5.16 passes attention_mask=None to the indexer and masks by position there; the copy below does not.
        raise RuntimeError(
            f"the GLM-5 indexer fix copies transformers 5.17-5.19 code; found {transformers.__version__}, "
            "install transformers>=5.17"
        )
    for module in indexers:
        # A class swap rather than a bound method, so patched models still pickle and deepcopy.
        module.__class__ = _StableTiesGlmMoeDsaIndexer


class _StableTiesGlmMoeDsaIndexer(GlmMoeDsaIndexer):
    @torch.no_grad()
    def forward(
        self,
        hidden_states: torch.Tensor,
        q_resid: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        """`GlmMoeDsaIndexer.forward` of transformers 5.17-5.19 (identical in all three), ties made stable."""
        batch_size, seq_len, _ = hidden_states.shape
        cos, sin = position_embeddings
        q = self.wq_b(q_resid).view(batch_size, seq_len, self.n_heads, self.head_dim)  # (B, S, H, D)
        rope_split = [self.qk_rope_head_dim, self.head_dim - self.qk_rope_head_dim]
        q_rot, q_pass = torch.split(q, rope_split, dim=-1)
        k = self.k_norm(self.wk(hidden_states)).unsqueeze(2)  # (B, S, 1, D)
        k_rot, k_pass = torch.split(k, rope_split, dim=-1)
        q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
        q = torch.cat([q_rot, q_pass], dim=-1)
        k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)  # (B, S, D)
        if past_key_values is not None:
            k = past_key_values.update_indexer(k, self.layer_idx)  # (B, T, D)

        scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * self.softmax_scale
        scores = F.relu(scores)  # (B, S, H, T)
        weights = self.weights_proj(hidden_states.to(self.weights_proj.weight.dtype)).float()
        weights = weights * self.n_heads**-0.5  # (B, S, H)
        index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)  # (B, S, T)
        if attention_mask.dtype == torch.bool:
            index_scores = index_scores.masked_fill(~attention_mask, float("-inf"))
        else:
            index_scores = index_scores + attention_mask

        topk = min(self.index_topk, index_scores.shape[-1])
        order = index_scores.sort(dim=-1, descending=True, stable=True).indices  # (B, S, T)
        return order[..., :topk].to(torch.int32)
