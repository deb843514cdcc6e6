"""GPT-2, written from scratch as a first-class Hugging Face model.

The model is plain PyTorch in the shape of nanoGPT (parameter names follow GPT-2, so official
weights load key by key), wrapped in transformers' base classes so that `save_pretrained`,
`AutoModelForCausalLM`, `generate()`, the Hub and lm-evaluation-harness treat it as native.

This file imports only torch, transformers, huggingface_hub and the standard library, in every function
too: `save_pretrained` copies it next to the weights, and transformers reads all of its import statements
before it loads it, so a saved or pushed folder loads with `trust_remote_code=True` on a machine without
this project. Conversions from and to other layouts (official GPT-2, nanoGPT, raw state dicts) are
functions of `gpt2_scratch/conversion.py`, which imports this file and never the reverse.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
import transformers
from huggingface_hub.dataclasses import strict
from torch import nn

if int(transformers.__version__.split(".")[0]) < 5:  # strict configs, `initialization`, the v5 Cache below
    raise ImportError(
        f"modeling_gpt2_scratch needs transformers >= 5 (this is {transformers.__version__}); with transformers "
        "4.x, load the same weights from the run's official GPT-2 export, hf-gpt2/ (GPT2LMHeadModel, no remote code)"
    )

from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

# GPT-2's BPE vocabulary: 50,257 tokens, the last of which, `<|endoftext|>`, separates documents. The
# tokenizer, the data and the conversions read these two numbers from here.
GPT2_VOCAB_SIZE = 50257
EOT_TOKEN_ID = 50256

# The single source of truth for model sizes: the trainer, the benchmarks, the docs and the tests
# all read this table. The four GPT-2 sizes are those of the GPT-2 paper (table 2); the small ones
# are for CPU work and tests.
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "cpu-mini": dict(n_layer=6, n_head=6, n_embd=384, n_positions=1024),  # 30M, the CPU benchmark size
    "cpu-micro": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256),  # 7M, the default CPU training run
    "cpu-nano": dict(n_layer=2, n_head=2, n_embd=32, n_positions=64),  # 1.7M, for tests
}


@strict(accept_kwargs=True)
class GPT2ScratchConfig(PreTrainedConfig):
    r"""Configuration of a from-scratch GPT-2.

    Field names are GPT-2's; `hidden_size`, `num_hidden_layers`, `num_attention_heads` and
    `max_position_embeddings` are aliases. `padded_vocab_size` rounds `vocab_size` up to a multiple
    of `pad_vocab_multiple` (50,257 -> 50,304) for fast GPU matmuls; the model never returns the
    padding columns. `activation_function` is GPT-2's tanh-approximated GELU (`"gelu_new"`, also
    build-nanogpt's) or the exact erf GELU (`"gelu"`, nanoGPT's `nn.GELU()`).
    """

    model_type = "gpt2_scratch"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = GPT2_VOCAB_SIZE
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    dropout: float = 0.0
    activation_function: str = "gelu_new"
    pad_vocab_multiple: int = 64
    use_cache: bool = True
    bos_token_id: int | None = EOT_TOKEN_ID
    eos_token_id: int | None = EOT_TOKEN_ID
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    def validate_architecture(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation_function not in GELU_APPROXIMATION:
            raise ValueError(
                f"activation_function={self.activation_function!r} is not supported; "
                f"choose one of {sorted(GELU_APPROXIMATION)}"
            )

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_multiple) * self.pad_vocab_multiple

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPT2ScratchConfig:
        """A config from the `PRESETS` table, e.g. `from_preset("gpt2", n_layer=2)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N for the matmuls plus the attention term (PaLM, appendix B).

        N counts every parameter that takes part in a matmul: all but the position embeddings,
        with the (tied) token embedding at its padded size, as the output projection runs on it.
        """
        d, n_layer = self.n_embd, self.n_layer
        per_block = 12 * d * d + 13 * d  # c_attn, c_proj, c_fc, c_proj weights and biases, two LayerNorms
        n_params = n_layer * per_block + 2 * d + self.padded_vocab_size * d
        return 6 * n_params + 12 * n_layer * d * seq_len


# The output field of the KV cache: `cache` from transformers 5.24 on, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# The activations the MLP implements, as `F.gelu`'s `approximate` argument; names are transformers'.
GELU_APPROXIMATION = {"gelu_new": "tanh", "gelu": "none"}


class GPT2ScratchAttention(nn.Module):
    def __init__(self, config: GPT2ScratchConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.n_embd, self.layer_idx = config.n_head, config.n_embd, layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True
        self.dropout = config.dropout

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        eager: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention output, and the attention weights (B, nh, T, S) when `eager` (else None)."""
        B, T, C = hidden_states.shape
        q, k, v = self.c_attn(hidden_states).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # (B, nh, S, hs), S = past + T
        dropout = self.dropout if self.training else 0.0
        if eager:
            y, weights = eager_attention(q, k, v, attention_mask, dropout)
        else:
            # No mask means plain causal attention, which SDPA runs with its flash / fused kernels.
            causal = attention_mask is None and T > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal)
            weights = None  # SDPA never forms them: the fast path
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): re-assemble all head outputs side by side
        return F.dropout(self.c_proj(y), self.dropout, self.training), weights


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out as GPT-2's eager path computes it, softmax(q k^T / sqrt(hs) + mask) v, which
    also gives the weights: for `output_attentions` and `attn_implementation="eager"` only, as it holds
    the (B, nh, T, S) scores that SDPA never forms. `attention_mask` is `attention_bias`'s: None for plain
    causal attention, a boolean mask (True = visible) or an additive one."""
    T, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])  # (B, nh, T, S)
    if attention_mask is None:  # causal: the T queries are the last T of the S positions
        attention_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    weights = F.dropout(F.softmax(scores, dim=-1).to(v.dtype), dropout)  # (B, nh, T, S); GPT-2 returns them dropped
    return weights @ v, weights  # (B, nh, T, hs)


class GPT2ScratchMLP(nn.Module):
    def __init__(self, config: GPT2ScratchConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True
        self.dropout = config.dropout
        self.approximate = GELU_APPROXIMATION[config.activation_function]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = F.gelu(self.c_fc(hidden_states), approximate=self.approximate)
        return F.dropout(self.c_proj(hidden_states), self.dropout, self.training)


class GPT2ScratchBlock(GradientCheckpointingLayer):
    """A pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2ScratchConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2ScratchAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2ScratchMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        eager: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's output, and its attention weights when `eager` (else None)."""
        attn, weights = self.attn(self.ln_1(hidden_states), attention_mask, past_key_values, eager)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.ln_2(hidden_states)), weights


def attention_bias(
    attention_mask: torch.Tensor | None, query_len: int, past_len: int, device: torch.device
) -> torch.Tensor | None:
    """The boolean SDPA mask (B, 1, T, S) for a 2-D padding mask, or None for plain causal attention.

    Key j is visible to query i when it is not padding and j <= past_len + i. Each query also sees
    itself, so a padding row never has every key masked (which would make SDPA return NaN).
    """
    if attention_mask is None:
        # A single query over the cache sees every key; several queries with no cache are plain
        # causal. Several queries after a cache (chunked prefill) need the offset mask below.
        if query_len == 1 or past_len == 0:
            return None
        attention_mask = torch.ones(1, past_len + query_len, dtype=torch.bool, device=device)
    if attention_mask.dim() == 4:
        return attention_mask  # already a (B, 1, T, S) mask, boolean or additive
    key_len = attention_mask.shape[1]
    query_pos = torch.arange(past_len, past_len + query_len, device=device)[:, None]  # (T, 1)
    key_pos = torch.arange(key_len, device=device)[None, :]  # (1, S)
    visible = (key_pos <= query_pos) & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    return visible | (key_pos == query_pos)


# Chunks of rows of the logits-free loss: at B=8, T=256 one chunk of fp32 logits is 100 MB instead of
# 400 MB for all rows; more chunks save little more memory and make the matmuls smaller.
LOSS_CHUNKS = 4


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` against `targets`, summed and divided by `divisor`, a few
    rows at a time.

    The plain path holds the (N, vocab) logits, their log-softmax and both gradients: four tensors of
    400 MB each at B=8, T=256. Here each chunk of rows makes its logits, adds to the loss and turns
    them at once into their gradient, softmax - one_hot (the backward of the loss is known in the
    forward); the gradients of `hidden` and `weight` are summed over the chunks and kept for
    `backward`. Memory: one chunk of logits instead of four full tensors; work: the same three matmuls
    as the plain path. The matmuls run on the padded weight (fast shapes); the padding columns are set
    to -inf, so they get zero probability and zero gradient. In fp32 one (rows, vocab) buffer serves
    every chunk: logits, log-softmax and gradient are written over each other, and `backward` scales
    the saved sums in place (each new 100 MB tensor costs page faults and a peak of its own).

    Precision: the sums are kept undivided (each row's gradient is O(1)) and the weight's gradient is
    summed in fp32; the division by `divisor` and the loss scale of `backward` are applied once, in
    fp32, at the end. So bf16 / fp16 models and fp16 loss scaling lose nothing to underflow.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size: int, num_chunks: int, divisor):
        valid = targets != -100
        divisor = torch.as_tensor(valid.sum() if divisor is None else divisor, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = None
        loss = hidden.new_zeros((), dtype=torch.float32)
        rows = -(-hidden.shape[0] // num_chunks)
        # fp32 without autocast: every chunk's logits go into one buffer, made once (a fresh 100 MB
        # tensor per chunk costs its page faults, a fifth of the matmul's time here).
        reuse = hidden.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(hidden.device.type)
        buffer = hidden.new_empty(min(rows, hidden.shape[0]), weight.shape[0]) if reuse else None
        chunks = zip(hidden.split(rows), targets.split(rows), valid.split(rows), grad_hidden.split(rows), strict=True)
        for h, t, v, grad_h in chunks:
            if reuse:
                logits = torch.mm(h, weight.T, out=buffer[: h.shape[0]])  # (rows, padded_vocab)
            else:
                logits = (h @ weight.T).float()
            logits[:, vocab_size:] = float("-inf")
            log_probs = torch.log_softmax(logits, dim=1, out=logits)  # in place: one (rows, vocab) tensor
            t = t.clamp(min=0).unsqueeze(1)  # ignored rows pick token 0; `keep` zeroes them below
            keep = v.unsqueeze(1).to(h.dtype)  # (rows, 1): 1 for a real target, 0 for -100
            loss -= (log_probs.gather(1, t) * keep).sum()
            grad = log_probs.exp_().scatter_add_(1, t, torch.full_like(t, -1, dtype=log_probs.dtype))
            grad = grad.to(h.dtype)  # softmax - one_hot: the gradient of each row's cross-entropy
            # The row mask goes on the small factors, (rows, C), never on the (rows, vocab) gradient.
            h = h * keep
            if reuse:  # fp32: written in place, no (vocab, C) temporary per chunk, no zero-filled start
                torch.mm(grad, weight, out=grad_h).mul_(keep)
                grad_weight = grad.T @ h if grad_weight is None else grad_weight.addmm_(grad.T, h)
            else:  # autocast or low precision (`out=` would bypass autocast): products summed in fp32
                grad_h.copy_((grad @ weight) * keep)
                product = (grad.T @ h).float()
                grad_weight = product if grad_weight is None else grad_weight.add_(product)
        ctx.save_for_backward(grad_hidden, grad_weight, divisor.to(loss.device))
        ctx.weight_dtype = weight.dtype
        return loss / divisor.to(loss.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        # Scaled in place: the saved sums are used once, and a copy would be another (vocab, C) tensor.
        grad_hidden, grad_weight, divisor = ctx.saved_tensors
        scale = grad_loss.float() / divisor
        return grad_hidden.mul_(scale), grad_weight.mul_(scale).to(ctx.weight_dtype), None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    num_chunks: int = LOSS_CHUNKS,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """`causal_lm_loss(F.linear(hidden, weight)[:, :vocab_size], targets, num_items_in_batch)` without
    materialising the logits: hidden (N, C), weight (padded_vocab, C), targets (N,)."""
    return LinearCrossEntropy.apply(hidden, weight, targets, vocab_size, num_chunks, num_items_in_batch)


def causal_lm_loss(
    logits: torch.Tensor, shift_labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy over the non-ignored (-100) targets: their mean, or their sum divided by
    `num_items_in_batch` (what transformers' Trainer passes under gradient accumulation, so that
    the micro-batches of a step add up to the mean over the whole step)."""
    logits, targets = logits.flatten(0, -2).float(), shift_labels.flatten()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=-100)
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / num_items_in_batch


class GPT2ScratchPreTrainedModel(PreTrainedModel):
    config_class = GPT2ScratchConfig
    config: GPT2ScratchConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPT2ScratchBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                # GPT-2 paper: scale the weights of residual layers by 1/sqrt(N), N = the number of
                # residual layers (two per block), so the residual stream's variance does not grow with depth.
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class GPT2ScratchForCausalLM(GPT2ScratchPreTrainedModel, GenerationMixin):
    """GPT-2 with its language-modelling head, whose weight is tied to the token embedding."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPT2ScratchConfig):
        super().__init__(config)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                h=nn.ModuleList(GPT2ScratchBlock(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses this from the source (an `AttentionInterface` dispatch); ours is the
        # explicit choice in `forward`: "sdpa" (the default) or "eager" (`eager_attention`).
        return True

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """transformers' resize, on the real tokens: `new_num_tokens` becomes `vocab_size`; the rows kept are
        copied, new rows are initialised as transformers does (with `mean_resizing`, drawn from the mean
        and covariance of the old real rows, never the padding rows). The matrix stays padded to
        `pad_vocab_multiple` (`pad_to_multiple_of` sets it) with zero rows, so it loads back at its size."""
        if pad_to_multiple_of is not None and not isinstance(pad_to_multiple_of, int):
            raise ValueError(
                f"Asking to pad the embedding matrix to a multiple of `{pad_to_multiple_of}`, which is not and integer."
                " Please make sure to pass an integer"
            )
        if new_num_tokens is None and pad_to_multiple_of is None:
            return self.get_input_embeddings()
        old_vocab, vocab_size = self.config.vocab_size, new_num_tokens or self.config.vocab_size
        self.config.pad_vocab_multiple = pad_to_multiple_of or self.config.pad_vocab_multiple
        self.config.vocab_size = self.vocab_size = vocab_size  # transformers' resize sets both
        rows, requires_grad = self.config.padded_vocab_size, self.transformer.wte.weight.requires_grad
        with torch.no_grad():  # no module made here draws random numbers: new rows get transformers' draws
            real = nn.Embedding.from_pretrained(self.transformer.wte.weight[:old_vocab], freeze=False)
            wte = self._get_resized_embeddings(real, vocab_size, mean_resizing=mean_resizing).weight
            self.transformer.wte = nn.Embedding.from_pretrained(padded_rows(wte, rows), freeze=False)
            self.transformer.wte._is_hf_initialized = True  # so that `post_init` keeps it
            if not self.config.tie_word_embeddings:
                real = nn.Linear(self.config.n_embd, old_vocab, bias=False, device="meta")
                real.weight = nn.Parameter(self.lm_head.weight[:old_vocab].clone())
                head = self._get_resized_lm_head(real, vocab_size, mean_resizing=mean_resizing).weight
                self.lm_head = nn.Linear(self.config.n_embd, rows, bias=False, device="meta")
                self.lm_head.weight = nn.Parameter(padded_rows(head, rows))
                self.lm_head._is_hf_initialized = True
        self.transformer.wte.weight.requires_grad_(requires_grad)
        self.lm_head.weight.requires_grad_(requires_grad)
        self.tie_weights()
        self.lm_head.out_features = rows  # a tied head is the old module holding the new weight
        return self.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        loss_only: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits over the `vocab_size` real tokens, and the loss when labels are given.

        `labels` are aligned with `input_ids` and shifted here (HF convention); `shift_labels` are
        already the next tokens (the trainer's `y`). Both ignore -100; the loss is their mean, or
        their sum over `num_items_in_batch` when that is given (transformers' Trainer). With
        `loss_only=True` (the trainer's call) the loss comes from `linear_cross_entropy`, which never
        holds the (B, T, vocab) logits, and `logits` is None; the value is the same.

        As in `GPT2LMHeadModel`: `inputs_embeds` (B, T, C) instead of `input_ids`; `token_type_ids`
        embedded with `wte` and added; `output_hidden_states` gives n_layer + 1 states (the embeddings,
        each block's output, the last after `ln_f`; given indices, only those, the others None);
        `output_attentions` gives each block's weights through `eager_attention`; `return_dict=False`
        gives a tuple. Unset, the last three follow the config.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        # transformers >= 5.24 passes the KV cache as `cache`, older 5.x as `past_key_values`: warned
        # about, as transformers' own models do, only where `cache` is the name.
        past_key_values = cache if cache is not None else kwargs.get("past_key_values")
        if "past_key_values" in kwargs and CACHE_FIELD == "cache":
            warnings.warn("`past_key_values` is deprecated for `forward`. Use `cache` instead.", FutureWarning, 2)
        if use_cache is None:
            use_cache = config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
        x, mask = self.embed(input_ids, inputs_embeds, token_type_ids, attention_mask, position_ids, past_key_values)
        keep = kept_hidden_states(output_hidden_states, config.n_layer + 1)
        hidden_states, attentions = [], []
        eager = output_attentions or config._attn_implementation == "eager"
        for i, block in enumerate(self.transformer.h):
            if keep:
                hidden_states.append(x if i in keep else None)  # GPT-2's first is the embeddings, block 0's input
            x, weights = block(x, attention_mask=mask, past_key_values=past_key_values, eager=eager)
            attentions.append(weights)
        x = self.transformer.ln_f(x)
        last = x if config.n_layer in keep else None  # after ln_f, as GPT-2's
        extra = dict(
            hidden_states=(*hidden_states, last) if keep else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        output = self.head(x, labels, shift_labels, logits_to_keep, num_items_in_batch, loss_only)
        output = CausalLMOutputWithPast(**output, **extra, **{CACHE_FIELD: past_key_values if use_cache else None})
        return output if (config.return_dict if return_dict is None else return_dict) else output.to_tuple()

    def embed(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        token_type_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        past_key_values: Cache | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The blocks' input (B, T, C), token plus position (plus token type) embeddings, and their mask."""
        if inputs_embeds is None:
            inputs_embeds = self.transformer.wte(input_ids)  # (B, T, C)
        T, device = inputs_embeds.shape[1], inputs_embeds.device
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and not torch.compiler.is_compiling() and bool(attention_mask.all()):
            attention_mask = None  # no padding: take SDPA's fast causal path (a sync, so only in eager mode)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, T, past_len, device)
        x = inputs_embeds + self.transformer.wpe(position_ids)  # (B, T, C)
        if token_type_ids is not None:
            x = x + self.transformer.wte(token_type_ids)  # GPT-2 embeds segment ids with the token embedding
        x = F.dropout(x, self.config.dropout, self.training)
        return x, attention_bias(attention_mask, T, past_len, device)

    def head(
        self,
        x: torch.Tensor,
        labels: torch.LongTensor | None,
        shift_labels: torch.LongTensor | None,
        logits_to_keep: int,
        num_items_in_batch: int | torch.Tensor | None,
        loss_only: bool,
    ) -> dict[str, torch.Tensor | None]:
        """`loss` and `logits` from the final hidden states x (B, T, C); see `forward`."""
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        vocab_size = self.config.vocab_size
        if labels is not None and shift_labels is None:  # given both, the pre-shifted targets win, as in transformers
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]  # position t predicts token t + 1
        if loss_only:
            if shift_labels is None:
                raise ValueError("loss_only=True needs labels or shift_labels")
            flat_labels = shift_labels.flatten()
            loss = linear_cross_entropy(
                x.flatten(0, 1), self.lm_head.weight, flat_labels, vocab_size, LOSS_CHUNKS, num_items_in_batch
            )
            return dict(loss=loss, logits=None)
        logits = self.lm_head(x)[..., :vocab_size]  # (B, T, vocab), a view without the padding columns
        loss = None if shift_labels is None else causal_lm_loss(logits, shift_labels, num_items_in_batch)
        return dict(loss=loss, logits=logits)


def kept_hidden_states(selection: bool | int | list[int] | None, count: int) -> set[int]:
    """The indices of the `count` hidden states that `output_hidden_states` asks for: all (True), none
    (False), or the given ones (an int or a list; negative ones count from the end, as in transformers)."""
    if selection is None or isinstance(selection, bool):
        return set(range(count)) if selection else set()
    indices = [selection] if isinstance(selection, int) else selection
    return {i % count for i in indices if -count <= i < count}


def padded_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with zero rows appended up to `rows` (the padded vocabulary)."""
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def positions_from_mask(
    attention_mask: torch.Tensor | None, query_len: int, past_len: int, device: torch.device
) -> torch.Tensor:
    """Position ids (B or 1, T): counted over real tokens only, so left padding does not shift them."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.arange(past_len, past_len + query_len, device=device).unsqueeze(0)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_len:]


# Importing this module makes the model known to the Auto classes, and `save_pretrained` writes this
# file and an `auto_map` into the folder so that it loads elsewhere with `trust_remote_code=True`.
AutoConfig.register(GPT2ScratchConfig.model_type, GPT2ScratchConfig, exist_ok=True)
AutoModelForCausalLM.register(GPT2ScratchConfig, GPT2ScratchForCausalLM, exist_ok=True)
GPT2ScratchConfig.register_for_auto_class()
GPT2ScratchForCausalLM.register_for_auto_class("AutoModelForCausalLM")
