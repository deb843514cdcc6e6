"""nanoGPT / build-nanogpt checkpoints into our HF format, against a direct computation from the state dict.

The checkpoints are built here in the layouts the two projects save: nanoGPT's `ckpt.pt` (`model`,
`model_args`, `optimizer`, `config`, ...) and build-nanogpt's `model_XXXXX.pt` (`model`, `config` as a
pickled `__main__.GPTConfig` dataclass, `step`, `val_loss`), from modules with nanoGPT's names and
`nn.Linear` layout, optionally wrapped by torch.compile or (Distributed)DataParallel.
"""

import dataclasses
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpt2_scratch import convert_nanogpt
from gpt2_scratch.conversion import (
    NanoGPTCheckpointError,
    from_gpt2_model,
    from_nanogpt,
    from_state_dict,
    load_nanogpt_checkpoint,
    strip_wrapper_prefixes,
    to_gpt2,
)
from gpt2_scratch.user_errors import run_command
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE = 2, 2, 32, 16
GPT2_VOCAB = 50257


@dataclasses.dataclass
class GPTConfig:
    """build-nanogpt's config, field for field; its checkpoints pickle it as `__main__.GPTConfig`."""

    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


def nanogpt_module(vocab_size: int, bias: bool = True, mask_buffers: bool = False, seed: int = 0) -> nn.Module:
    """A module whose state dict is nanoGPT's (and build-nanogpt's), with random non-trivial values."""
    C = N_EMBD

    def sub(**children) -> nn.Module:
        module = nn.Module()
        for name, child in children.items():
            setattr(module, name, child)
        return module

    blocks = []
    for _ in range(N_LAYER):
        attn = sub(c_attn=nn.Linear(C, 3 * C, bias=bias), c_proj=nn.Linear(C, C, bias=bias))
        if mask_buffers:  # older nanoGPT (no flash attention) saves its causal mask as `attn.bias`
            attn.register_buffer("bias", torch.tril(torch.ones(BLOCK_SIZE, BLOCK_SIZE)).view(1, 1, BLOCK_SIZE, -1))
        mlp = sub(c_fc=nn.Linear(C, 4 * C, bias=bias), c_proj=nn.Linear(4 * C, C, bias=bias))
        blocks.append(sub(ln_1=nn.LayerNorm(C, bias=bias), attn=attn, ln_2=nn.LayerNorm(C, bias=bias), mlp=mlp))
    model = sub(
        transformer=nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, C),
                wpe=nn.Embedding(BLOCK_SIZE, C),
                h=nn.ModuleList(blocks),
                ln_f=nn.LayerNorm(C, bias=bias),
            )
        ),
        lm_head=nn.Linear(C, vocab_size, bias=False),
    )
    model.transformer.wte.weight = model.lm_head.weight  # nanoGPT's weight tying
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.1 * noise if "ln" in name and name.endswith("weight") else 0.3 * noise)
    return model


def wrapped_state_dict(model: nn.Module, wrapper: str) -> dict[str, torch.Tensor]:
    """The state dict as saved from the model inside torch.compile and/or (Distributed)DataParallel."""
    if wrapper in ("compile", "dp+compile"):
        model = torch.compile(model)  # an OptimizedModule: keys start with `_orig_mod.`
    if wrapper in ("dp", "dp+compile"):
        model = nn.DataParallel(model)  # keys start with `module.`, as DDP's do
    return model.state_dict()


def reference_logits(state: dict[str, torch.Tensor], ids: torch.Tensor, gelu: str, bias: bool) -> torch.Tensor:
    """nanoGPT's forward written out with plain torch ops on its state dict (explicit masked softmax)."""
    C, T, hs = N_EMBD, ids.shape[1], N_EMBD // N_HEAD

    def ln(x, prefix):
        return F.layer_norm(x, (C,), state[prefix + ".weight"], state.get(prefix + ".bias"), 1e-5)

    def linear(x, prefix):
        return F.linear(x, state[prefix + ".weight"], state[prefix + ".bias"] if bias else None)

    x = state["transformer.wte.weight"][ids] + state["transformer.wpe.weight"][:T]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(N_LAYER):
        p = f"transformer.h.{i}."
        q, k, v = linear(ln(x, p + "ln_1"), p + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(*ids.shape, N_HEAD, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        y = att.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + linear(y.transpose(1, 2).reshape(*ids.shape, C), p + "attn.c_proj")
        h = F.gelu(linear(ln(x, p + "ln_2"), p + "mlp.c_fc"), approximate=gelu)
        x = x + linear(h, p + "mlp.c_proj")
    return ln(x, "transformer.ln_f") @ state["lm_head.weight"].T


def nanogpt_checkpoint(model: nn.Module, wrapper: str, vocab_size: int, bias: bool) -> dict:
    """What nanoGPT's train.py saves as `ckpt.pt`."""
    model_args = dict(
        n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, block_size=BLOCK_SIZE, bias=bias, vocab_size=vocab_size
    )
    model_args["dropout"] = 0.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), fused=False)
    return {
        "model": wrapped_state_dict(model, wrapper),
        "optimizer": optimizer.state_dict(),
        "model_args": model_args,
        "iter_num": 2000,
        "best_val_loss": torch.tensor(2.85),
        "config": {"out_dir": "out", "init_from": "scratch", "compile": wrapper != "none", **model_args},
    }


def build_nanogpt_checkpoint(model: nn.Module, wrapper: str, vocab_size: int) -> dict:
    """What build-nanogpt's train_gpt2.py saves as `log/model_XXXXX.pt`."""
    config = GPTConfig(block_size=BLOCK_SIZE, vocab_size=vocab_size, n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD)
    return {"model": wrapped_state_dict(model, wrapper), "config": config, "step": 19072, "val_loss": 3.07}


@pytest.fixture
def save_as_main_script(monkeypatch):
    """torch.save that pickles `GPTConfig` by reference to `__main__`, as a run of `python train_gpt2.py` does."""
    monkeypatch.setattr(GPTConfig, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "GPTConfig", GPTConfig, raising=False)
    return torch.save


# (checkpoint format, activation its MLP uses, bias): nanoGPT uses nn.GELU() (exact), build-nanogpt the tanh one.
FORMATS = {
    "nanogpt": ("none", True),
    "nanogpt-bias-false": ("none", False),
    "build-nanogpt": ("tanh", True),
}


@pytest.mark.parametrize("vocab_size", [50304, GPT2_VOCAB])
@pytest.mark.parametrize("wrapper", ["none", "compile", "dp", "dp+compile"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_converted_logits_match_direct_computation(tmp_path, save_as_main_script, fmt, wrapper, vocab_size):
    gelu, bias = FORMATS[fmt]
    source = nanogpt_module(vocab_size, bias=bias, mask_buffers=fmt == "nanogpt")
    if fmt == "build-nanogpt":
        checkpoint = build_nanogpt_checkpoint(source, wrapper, vocab_size)
    else:
        checkpoint = nanogpt_checkpoint(source, wrapper, vocab_size, bias)
    path = tmp_path / "ckpt.pt"
    save_as_main_script(checkpoint, path)
    if fmt == "build-nanogpt":
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == ["__main__.GPTConfig"]

    model = from_nanogpt(path)
    ids = torch.randint(0, GPT2_VOCAB, (2, BLOCK_SIZE), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
        expected = reference_logits(source.state_dict(), ids, gelu, bias)[..., :GPT2_VOCAB]
    assert model.config.vocab_size == GPT2_VOCAB and logits.shape == (2, BLOCK_SIZE, GPT2_VOCAB)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    if not bias:
        assert all(not p.any() for name, p in model.named_parameters() if name.endswith(".bias"))


def test_the_activation_matters_and_can_be_overridden(tmp_path):
    """nanoGPT's exact GELU and build-nanogpt's tanh GELU give measurably different logits."""
    source = nanogpt_module(GPT2_VOCAB)
    torch.save(nanogpt_checkpoint(source, "none", GPT2_VOCAB, bias=True), tmp_path / "ckpt.pt")
    ids = torch.arange(BLOCK_SIZE).unsqueeze(0)
    with torch.no_grad():
        tanh = from_nanogpt(tmp_path / "ckpt.pt", activation_function="gelu_new")
        assert tanh.config.activation_function == "gelu_new"
        expected = reference_logits(source.state_dict(), ids, "tanh", bias=True)
        torch.testing.assert_close(tanh(ids).logits, expected, atol=1e-5, rtol=1e-5)
        exact = reference_logits(source.state_dict(), ids, "none", bias=True)
        assert (tanh(ids).logits - exact).abs().max() > 1e-4


def test_cli_writes_a_folder_that_auto_classes_load(tmp_path, save_as_main_script, capsys):
    source = nanogpt_module(50304, seed=3)
    save_as_main_script(build_nanogpt_checkpoint(source, "compile", 50304), tmp_path / "model_19072.pt")
    out = tmp_path / "hf"
    convert_nanogpt.main([str(tmp_path / "model_19072.pt"), str(out)])
    assert "with the GPT-2 tokenizer" in capsys.readouterr().out
    assert (out / "modeling_gpt2_scratch.py").is_file() and (out / "model.safetensors").is_file()

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Hello world", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[15496, 995]]  # GPT-2's ids for "Hello" and " world"
    with torch.no_grad():
        expected = reference_logits(source.state_dict(), ids, "tanh", bias=True)[..., :GPT2_VOCAB]
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_cli_skips_the_tokenizer_for_another_vocabulary(tmp_path, capsys):
    torch.save(nanogpt_checkpoint(nanogpt_module(65), "none", 65, bias=False), tmp_path / "ckpt.pt")
    convert_nanogpt.main([str(tmp_path / "ckpt.pt"), str(tmp_path / "hf")])
    assert "without a tokenizer" in capsys.readouterr().out
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.vocab_size == 65


class RunsCode:
    """A pickle that runs a shell command when loaded by a plain `torch.load(weights_only=False)`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def not_a_checkpoint(kind: str, tmp_path) -> tuple[object, str]:
    """(what to write, what the error must say) for a file that is not a nanoGPT checkpoint."""
    state = nanogpt_module(GPT2_VOCAB).state_dict()
    return {
        "random-bytes": (os.urandom(4096), "is not a readable torch checkpoint"),
        "empty": (b"", "is not a readable torch checkpoint"),
        "tensor": (torch.zeros(3), "holds Tensor"),
        "no-model": ({"state_dict": state}, r"holds a dict with keys \['state_dict'\]"),
        "no-config": ({"model": state, "step": 1}, "has no model config with n_layer"),
        "runs-code": ({"model": state, "config": RunsCode(tmp_path / "pwned")}, "pickles posix.system"),
        "wrong-width": (
            {
                "model": state,
                "model_args": dict(
                    n_layer=N_LAYER, n_head=N_HEAD, n_embd=64, block_size=BLOCK_SIZE, vocab_size=GPT2_VOCAB, bias=True
                ),
            },
            r"transformer.wte.weight has shape \(50257, 32\); its config implies \(50257 to 50304, 64\)",
        ),
    }[kind]


@pytest.mark.parametrize(
    "kind", ["random-bytes", "empty", "tensor", "no-model", "no-config", "runs-code", "wrong-width"]
)
def test_a_file_that_is_not_a_checkpoint_gives_a_clear_error(tmp_path, kind, capsys):
    content, message = not_a_checkpoint(kind, tmp_path)
    path = tmp_path / "ckpt.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(NanoGPTCheckpointError, match=message) as error:
        from_nanogpt(path)
    assert str(path) in str(error.value)
    assert not (tmp_path / "pwned").exists()  # nothing in the file ran
    with pytest.raises(SystemExit) as exited:
        run_command(convert_nanogpt.main, [str(path), str(tmp_path / "hf")])
    assert exited.value.code == 2 and capsys.readouterr().err.startswith(f"error: {path}")


def test_missing_file_and_untied_head_are_refused(tmp_path):
    with pytest.raises(NanoGPTCheckpointError, match="no checkpoint file at"):
        load_nanogpt_checkpoint(tmp_path / "missing.pt")
    checkpoint = nanogpt_checkpoint(nanogpt_module(GPT2_VOCAB), "none", GPT2_VOCAB, bias=True)
    checkpoint["model"]["lm_head.weight"] = checkpoint["model"]["lm_head.weight"].clone() + 1
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    with pytest.raises(NanoGPTCheckpointError, match="lm_head.weight differs from transformer.wte.weight"):
        from_nanogpt(tmp_path / "ckpt.pt")


def test_strip_wrapper_prefixes():
    one = torch.ones(1)
    assert strip_wrapper_prefixes({"module._orig_mod.a.b": one, "_orig_mod.module.c": one, "d.module.e": one}) == {
        "a.b": one,
        "c": one,
        "d.module.e": one,  # only leading wrapper prefixes go
    }
    with pytest.raises(ValueError, match="'module.a' and another key that is also 'a'"):
        strip_wrapper_prefixes({"a": one, "module.a": one})


def test_pickled_config_is_read_into_an_inert_stand_in(tmp_path, save_as_main_script, monkeypatch):
    """The script's own GPTConfig class is never looked up: its code cannot run at load time."""
    checkpoint = build_nanogpt_checkpoint(nanogpt_module(GPT2_VOCAB), "none", GPT2_VOCAB)
    save_as_main_script(checkpoint, tmp_path / "model.pt")

    def runs_code(self, state):
        raise AssertionError("GPTConfig.__setstate__ from the checkpoint's script ran")

    monkeypatch.setattr(GPTConfig, "__setstate__", runs_code, raising=False)
    with pytest.raises(AssertionError, match="ran"):
        torch.load(tmp_path / "model.pt", weights_only=False)  # what an unrestricted load would do
    loaded = load_nanogpt_checkpoint(tmp_path / "model.pt")
    assert type(loaded["config"]).__name__ == "PickledGPTConfig"
    assert vars(loaded["config"]) == dataclasses.asdict(checkpoint["config"])


def test_exact_gelu_exports_to_transformers_gpt2(tmp_path):
    """nanoGPT's exact GELU is transformers' `activation_function="gelu"`, both ways."""
    source = nanogpt_module(GPT2_VOCAB)
    torch.save(nanogpt_checkpoint(source, "none", GPT2_VOCAB, bias=True), tmp_path / "ckpt.pt")
    ours = from_nanogpt(tmp_path / "ckpt.pt")
    official = to_gpt2(ours).eval()
    assert official.config.activation_function == "gelu"
    ids = torch.arange(BLOCK_SIZE).unsqueeze(0)
    with torch.no_grad():
        expected = reference_logits(source.state_dict(), ids, "none", bias=True)
        torch.testing.assert_close(official(ids).logits, expected, atol=1e-5, rtol=1e-5)
        back = from_gpt2_model(official).eval()
        assert back.config.activation_function == "gelu"
        torch.testing.assert_close(back(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_from_state_dict_takes_our_own_wrapped_state_dict():
    """A raw state dict of our model saved from inside torch.compile and DDP loads as it is."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano")).eval()
    raw = wrapped_state_dict(model, "dp+compile")
    assert all(key.startswith("module._orig_mod.") for key in raw)
    loaded = from_state_dict(model.config, raw).eval()
    ids = torch.arange(BLOCK_SIZE).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
