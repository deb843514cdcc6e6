"""GPT-2, written from scratch as a first-class Hugging Face model.

The model is plain PyTorch in the shape of nanoGPT (parameter names follow GPT-2, so official
weights load key by key), wrapped in transformers' base classes so that `save_pretrained`,
`AutoModelForCausalLM`, `generate()`, the Hub and lm-evaluation-harness treat it as native.

This file imports only torch and transformers: `save_pretrained` copies it next to the weights,
so a saved or pushed folder loads with `trust_remote_code=True` on a machine without this project.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

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

    vocab_size: int = 50257
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
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
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
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, past_key_values: Cache | None
    ) -> torch.Tensor:
        B, T, C = hidden_states.shape
        q, k, v = self.c_attn(hidden_states).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # (B, nh, S, hs), S = past + T
        # No mask means plain causal attention, which SDPA runs with its flash / fused kernels.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attention_mask is None and T > 1,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return F.dropout(self.c_proj(y), self.dropout, self.training)


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
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), attention_mask, past_key_values)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


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


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` against `targets`, summed and divided by `divisor`, a few
    rows at a time.

    The plain path holds the (N, vocab) logits, their log-softmax and both gradients: four tensors of
    400 MB each at B=8, T=256. Here each chunk of rows makes its logits, adds to the loss and turns
    them at once into their gradient, softmax - one_hot (the backward of the loss is known in the
    forward); the gradients of `hidden` and `weight` are summed over the chunks and kept for
    `backward`. Memory: one chunk of logits instead of four full tensors; work: the same three matmuls
    as the plain path. The matmuls run on the padded weight (fast shapes); the padding columns are set
    to -inf, so they get zero probability and zero gradient.

    Precision: the sums are kept undivided (each row's gradient is O(1)) and the weight's gradient is
    summed in fp32; the division by `divisor` and the loss scale of `backward` are applied once, in
    fp32, at the end. So bf16 / fp16 models and fp16 loss scaling lose nothing to underflow.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size: int, num_chunks: int, divisor):
        valid = targets != -100
        divisor = torch.as_tensor(valid.sum() if divisor is None else divisor, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        loss = hidden.new_zeros((), dtype=torch.float32)
        rows = -(-hidden.shape[0] // num_chunks)
        chunks = zip(hidden.split(rows), targets.split(rows), valid.split(rows), grad_hidden.split(rows), strict=True)
        for h, t, v, grad_h in chunks:
            logits = (h @ weight.T).float()  # (rows, padded_vocab)
            logits[:, vocab_size:] = float("-inf")
            log_probs = torch.log_softmax(logits, dim=1)
            t = t.clamp(min=0).unsqueeze(1)  # ignored rows pick token 0; `keep` zeroes them below
            keep = v.unsqueeze(1)  # (rows, 1): 1 for a real target, 0 for -100
            loss -= (log_probs.gather(1, t) * keep).sum()
            grad = log_probs.exp_().scatter_add_(1, t, torch.full_like(t, -1, dtype=log_probs.dtype))
            grad = grad.to(h.dtype)  # softmax - one_hot: the gradient of each row's cross-entropy
            # The row mask goes on the small factors, (rows, C), never on the (rows, vocab) gradient.
            h = h * keep.to(h.dtype)
            grad_h.copy_((grad @ weight) * keep.to(h.dtype))
            if grad_weight.dtype == h.dtype and not torch.is_autocast_enabled(h.device.type):
                grad_weight.addmm_(grad.T, h)  # summed in place: no (vocab, C) temporary per chunk
            else:
                grad_weight += (grad.T @ h).float()  # a low-precision product, summed in fp32
        divisor = divisor.to(loss.device)
        ctx.save_for_backward(grad_hidden, grad_weight, divisor)
        ctx.weight_dtype = weight.dtype
        return loss / divisor

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, divisor = ctx.saved_tensors
        scale = grad_loss.float() / divisor
        return grad_hidden * scale, (grad_weight * scale).to(ctx.weight_dtype), None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    num_chunks: int = 4,
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

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits over the `vocab_size` real tokens, and the loss when labels are given.

        `labels` are aligned with `input_ids` and shifted here (HF convention); `shift_labels` are
        already the next tokens (the trainer's `y`). Both ignore -100; the loss is their mean, or
        their sum over `num_items_in_batch` when that is given (transformers' Trainer). A training forward with
        `shift_labels` and gradients on (the trainer's call) returns `logits=None`: its loss comes
        from `linear_cross_entropy`, which never holds the (B, T, vocab) logits. Every other call
        (eval, `generate()`, `labels=`) returns the logits.
        """
        B, T = input_ids.shape
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and not torch.compiler.is_compiling() and bool(attention_mask.all()):
            attention_mask = None  # no padding: take SDPA's fast causal path (a sync, so only in eager mode)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, T, past_len, input_ids.device)
        mask = attention_bias(attention_mask, T, past_len, input_ids.device)

        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # (B, T, C)
        x = F.dropout(x, self.config.dropout, self.training)
        for block in self.transformer.h:
            x = block(x, attention_mask=mask, past_key_values=past_key_values)
        x = self.transformer.ln_f(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        cache, vocab_size = past_key_values if use_cache else None, self.config.vocab_size
        if shift_labels is not None and labels is None and self.training and torch.is_grad_enabled():
            # The training path: the loss straight from the hidden states, never the (B, T, vocab)
            # logits (see `linear_cross_entropy`); `logits` is None here.
            loss = linear_cross_entropy(
                x.flatten(0, 1), self.lm_head.weight, shift_labels.flatten(), vocab_size, 4, num_items_in_batch
            )
            return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=cache)
        logits = self.lm_head(x)[..., :vocab_size]  # (B, T, vocab), a view without the padding columns

        loss = None
        if labels is not None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]  # position t predicts token t + 1
        if shift_labels is not None:
            loss = causal_lm_loss(logits, shift_labels, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    @classmethod
    def from_gpt2(cls, name_or_path: str, **kwargs) -> GPT2ScratchForCausalLM:
        """Load an official-format GPT-2 checkpoint: a Hub id (`openai-community/gpt2`, `gpt2-xl`)
        or a folder written by `transformers.GPT2LMHeadModel.save_pretrained`."""
        from transformers import GPT2LMHeadModel

        return cls.from_gpt2_model(GPT2LMHeadModel.from_pretrained(name_or_path, **kwargs))

    @classmethod
    def from_gpt2_model(cls, official: nn.Module) -> GPT2ScratchForCausalLM:
        """Copy the weights of a `transformers.GPT2LMHeadModel` into a new model of this class."""
        state = {}
        for key, tensor in official.state_dict().items():
            if key.endswith(MASK_BUFFERS):
                continue
            # GPT-2's Conv1D stores weights as (in, out); nn.Linear wants (out, in).
            state[key] = tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor
        return cls.from_state_dict(scratch_config_from_gpt2(official.config), state)

    @classmethod
    def from_state_dict(cls, config: GPT2ScratchConfig, state: dict[str, torch.Tensor]) -> GPT2ScratchForCausalLM:
        """A model with exactly the weights of `state`, a state dict in this model's layout (nn.Linear
        weights) whose token embedding may lack the vocabulary padding rows; `lm_head.weight` is taken
        from the tied `transformer.wte.weight`. Keys may carry torch.compile / DDP prefixes (saved from a
        wrapped model). The model takes the embedding's dtype."""
        state = strip_wrapper_prefixes(state)
        if "transformer.wte.weight" not in state:
            raise ValueError(f"state dict has no transformer.wte.weight; found keys {sorted(state)[:8]}")
        wte = state["transformer.wte.weight"]
        state["transformer.wte.weight"] = state["lm_head.weight"] = pad_rows(wte, config.padded_vocab_size)
        model = cls(config).to(wte.dtype)
        model.load_state_dict(state, strict=True)
        model.tie_weights()
        return model

    @classmethod
    def from_nanogpt(
        cls, path: str | Path, vocab_size: int | None = None, activation_function: str | None = None
    ) -> GPT2ScratchForCausalLM:
        """Load a nanoGPT `ckpt.pt` or build-nanogpt `model_XXXXX.pt` checkpoint, in eval mode.

        The file is read with `torch.load(weights_only=True)`: no code in it runs (see
        `load_nanogpt_checkpoint`). `_orig_mod.` / `module.` key prefixes are stripped, old `attn.bias`
        mask buffers dropped, and the biases of a `bias=False` model loaded as zeros, which gives the
        same logits. A vocabulary of 50,304 is GPT-2's 50,257 padded (nanoGPT's default), so the model
        returns the first 50,257 logits; pass `vocab_size` to say otherwise. nanoGPT's MLP uses the
        exact GELU and build-nanogpt's the tanh one; the checkpoint's config tells them apart (only
        nanoGPT's has `bias`), and `activation_function` ("gelu" or "gelu_new") overrides that.
        """
        checkpoint = load_nanogpt_checkpoint(path)
        args = nanogpt_model_args(checkpoint, path)
        config = GPT2ScratchConfig(
            vocab_size=vocab_size or (50257 if args["vocab_size"] == 50304 else args["vocab_size"]),
            n_positions=args["block_size"],
            n_embd=args["n_embd"],
            n_layer=args["n_layer"],
            n_head=args["n_head"],
            dropout=args.get("dropout", 0.0),
            activation_function=activation_function or ("gelu" if "bias" in args else "gelu_new"),
        )
        with torch.device("meta"):
            expected = cls(config).state_dict()  # names and shapes only, no memory
        state = nanogpt_state_dict(checkpoint["model"], expected, config, biases=args.get("bias", True), path=path)
        return cls.from_state_dict(config, state).eval()

    def to_gpt2(self) -> nn.Module:
        """An equivalent `transformers.GPT2LMHeadModel` (the padding rows of the vocabulary dropped)."""
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
        official = GPT2Config(
            vocab_size=c.vocab_size,
            n_positions=c.n_positions,
            n_embd=c.n_embd,
            n_layer=c.n_layer,
            n_head=c.n_head,
            layer_norm_epsilon=c.layer_norm_epsilon,
            initializer_range=c.initializer_range,
            activation_function=c.activation_function,
            resid_pdrop=c.dropout,
            embd_pdrop=c.dropout,
            attn_pdrop=c.dropout,
            bos_token_id=c.bos_token_id,
            eos_token_id=c.eos_token_id,
            pad_token_id=c.pad_token_id,
        )
        model = GPT2LMHeadModel(official).to(self.dtype)
        state = {}
        for key, tensor in self.state_dict().items():
            tensor = tensor.detach()
            state[key] = tensor.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else tensor.clone()
        state["transformer.wte.weight"] = state["transformer.wte.weight"][: c.vocab_size].clone()
        state["lm_head.weight"] = state["transformer.wte.weight"]
        model.load_state_dict(state, strict=True)
        model.tie_weights()
        return model.eval() if not self.training else model


# The weights GPT-2 keeps in Conv1D layout (in, out).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers that old GPT-2 and nanoGPT checkpoints save; not weights.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
# What torch.compile (`OptimizedModule`) and DDP / DataParallel put before every state-dict key.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with the key prefixes of torch.compile and DDP removed, in any order and number
    (`module._orig_mod.transformer...` -> `transformer...`). Every loader of raw state dicts uses this."""
    stripped = {}
    for key, tensor in state_dict.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in stripped:
            raise ValueError(f"state dict has both {key!r} and another key that is also {name!r} without prefixes")
        stripped[name] = tensor
    return stripped


class NanoGPTCheckpointError(ValueError):
    """A file is not a nanoGPT / build-nanogpt checkpoint that this model can load."""


NANOGPT_EXPECTED = (
    "expected a nanoGPT ckpt.pt or build-nanogpt model_XXXXX.pt: a torch.save file holding a dict with the "
    "state dict under 'model' and the config under 'model_args' (a dict) or 'config' (a GPTConfig)"
)
NANOGPT_CONFIG_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


class PickledGPTConfig:
    """Stands in for the `GPTConfig` dataclass that build-nanogpt pickles by reference (as
    `__main__.GPTConfig`): the unpickler makes an instance of this inert class and sets its fields, so
    no code from the script that wrote the checkpoint is imported or run."""


def load_nanogpt_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict in `path`, read with `torch.load(weights_only=True)` onto the CPU.

    Only tensors, plain Python values and a class named `GPTConfig` (read into `PickledGPTConfig`) are
    allowed; any other pickled global is refused before anything is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise NanoGPTCheckpointError(f"no checkpoint file at {path}; {NANOGPT_EXPECTED}")
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        foreign = []  # not a zip checkpoint (legacy format or not one at all): torch.load below decides
    refused = sorted(name for name in foreign if name.rsplit(".", 1)[-1] != "GPTConfig")
    if refused:
        raise NanoGPTCheckpointError(
            f"{path} pickles {', '.join(refused)}, which could run code when loaded, so it is not read; "
            f"{NANOGPT_EXPECTED}"
        )
    try:
        with torch.serialization.safe_globals([(PickledGPTConfig, name) for name in foreign]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NanoGPTCheckpointError(
            f"{path} is not a readable torch checkpoint ({reason}); {NANOGPT_EXPECTED}"
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        found = (
            f"a dict with keys {sorted(map(str, checkpoint))}"
            if isinstance(checkpoint, dict)
            else type(checkpoint).__name__
        )
        raise NanoGPTCheckpointError(f"{path} holds {found}; {NANOGPT_EXPECTED}")
    return checkpoint


def nanogpt_model_args(checkpoint: dict, path: str | Path) -> dict:
    """The model's config fields: nanoGPT's `model_args`, else build-nanogpt's `config` (a GPTConfig)."""
    args = checkpoint.get("model_args", checkpoint.get("config"))
    args = vars(args) if isinstance(args, PickledGPTConfig) else args
    if not isinstance(args, dict) or not all(key in args for key in NANOGPT_CONFIG_FIELDS):
        found = f"fields {sorted(args)}" if isinstance(args, dict) else f"a {type(args).__name__}"
        raise NanoGPTCheckpointError(
            f"{path} has no model config with {', '.join(NANOGPT_CONFIG_FIELDS)} (found {found}); {NANOGPT_EXPECTED}"
        )
    return args


def nanogpt_state_dict(
    raw: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    config: GPT2ScratchConfig,
    biases: bool,
    path: str | Path,
) -> dict[str, torch.Tensor]:
    """A nanoGPT state dict in our layout, checked key by key and shape by shape against `expected`.

    nanoGPT already uses our names and `nn.Linear` layout, so this only strips wrapper prefixes, drops
    mask buffers, refuses an untied `lm_head`, and fills the biases of a `bias=False` model with zeros
    (nanoGPT's LayerNorm and Linear without bias compute exactly what ours do with a zero bias).
    """
    state = {k: v for k, v in strip_wrapper_prefixes(raw).items() if not k.endswith(MASK_BUFFERS)}
    wte, lm_head = state.get("transformer.wte.weight"), state.pop("lm_head.weight", None)
    if wte is not None and lm_head is not None and not torch.equal(wte, lm_head):
        raise NanoGPTCheckpointError(
            f"{path}: lm_head.weight differs from transformer.wte.weight; this model ties them (as nanoGPT does)"
        )
    if not biases:
        dtype = wte.dtype if wte is not None else torch.float32
        zeros = {name: torch.zeros(t.shape, dtype=dtype) for name, t in expected.items() if name.endswith(".bias")}
        state = {**zeros, **state}
    missing = sorted(set(expected) - set(state) - {"lm_head.weight"})
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise NanoGPTCheckpointError(
            f"{path}: the state dict under 'model' does not match its config ({config.n_layer} layers, bias={biases}):"
            f" missing {missing[:4]}{' ...' if len(missing) > 4 else ''},"
            f" unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}"
        )
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise NanoGPTCheckpointError(f"{path}: {name} is a {type(tensor).__name__}, not a tensor")
        want = tuple(expected[name].shape)
        if name == "transformer.wte.weight":
            # The rows may be the padded or the real vocabulary; from_state_dict pads them.
            fits = config.vocab_size <= tensor.shape[0] <= want[0] and tensor.shape[1] == want[1]
            want = f"({config.vocab_size} to {want[0]}, {want[1]})"
        else:
            fits = tuple(tensor.shape) == want
        if not fits:
            raise NanoGPTCheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}; its config implies {want}")
    return state


def positions_from_mask(
    attention_mask: torch.Tensor | None, query_len: int, past_len: int, device: torch.device
) -> torch.Tensor:
    """Position ids (B or 1, T): counted over real tokens only, so left padding does not shift them."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.arange(past_len, past_len + query_len, device=device).unsqueeze(0)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_len:]


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with zero rows appended up to `rows` (the padded vocabulary)."""
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def scratch_config_from_gpt2(official) -> GPT2ScratchConfig:
    """Our config for a `transformers.GPT2Config`, refusing GPT-2 variants this model does not implement."""
    unsupported = {
        "activation_function": (official.activation_function, tuple(GELU_APPROXIMATION)),
        "scale_attn_weights": (official.scale_attn_weights, True),
        "scale_attn_by_inverse_layer_idx": (official.scale_attn_by_inverse_layer_idx, False),
        "reorder_and_upcast_attn": (official.reorder_and_upcast_attn, False),
        "add_cross_attention": (official.add_cross_attention, False),
        "n_inner": (official.n_inner, None),
    }
    for key, (found, expected) in unsupported.items():
        supported = found in expected if isinstance(expected, tuple) else found == expected
        if not supported and not (key == "n_inner" and found == 4 * official.n_embd):
            raise ValueError(f"GPT-2 config has {key}={found!r}; GPT2ScratchForCausalLM supports only {expected!r}")
    return GPT2ScratchConfig(
        vocab_size=official.vocab_size,
        n_positions=official.n_positions,
        n_embd=official.n_embd,
        n_layer=official.n_layer,
        n_head=official.n_head,
        layer_norm_epsilon=official.layer_norm_epsilon,
        initializer_range=official.initializer_range,
        activation_function=official.activation_function,
        bos_token_id=official.bos_token_id,
        eos_token_id=official.eos_token_id,
        pad_token_id=official.pad_token_id,
    )


# Importing this module makes the model known to the Auto classes, and `save_pretrained` writes this
# file and an `auto_map` into the folder so that it loads elsewhere with `trust_remote_code=True`.
AutoConfig.register(GPT2ScratchConfig.model_type, GPT2ScratchConfig, exist_ok=True)
AutoModelForCausalLM.register(GPT2ScratchConfig, GPT2ScratchForCausalLM, exist_ok=True)
GPT2ScratchConfig.register_for_auto_class()
GPT2ScratchForCausalLM.register_for_auto_class("AutoModelForCausalLM")
