"""The from-scratch model against transformers' own GPT-2, on tiny configs and fixed seeds."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clean_interpreter import run_clean
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from gpt2_scratch.conversion import from_gpt2, from_gpt2_model, to_gpt2
from modeling_gpt2_scratch import PRESETS, GPT2ScratchConfig, GPT2ScratchForCausalLM

TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64)
VOCAB = 50257


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory):
    """A randomly initialised GPT-2 saved by transformers: exactly the official checkpoint layout."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("official")
    GPT2LMHeadModel(GPT2Config(**TINY)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair(official_folder):
    official = GPT2LMHeadModel.from_pretrained(official_folder).eval()
    ours = from_gpt2(str(official_folder)).eval()
    return official, ours


def random_ids(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(rows: list[torch.Tensor], pad_id: int = 50256):
    """Left-pad 1-D token tensors into (input_ids, attention_mask, position_ids)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def test_presets_and_aliases():
    config = GPT2ScratchConfig.from_preset("gpt2-medium", n_layer=3)
    assert (config.n_layer, config.n_head, config.n_embd) == (3, 16, 1024)
    assert config.hidden_size == 1024 and config.num_hidden_layers == 3 and config.num_attention_heads == 16
    assert config.max_position_embeddings == config.n_positions == 1024
    assert config.model_type == "gpt2_scratch"
    assert config.padded_vocab_size == 50304 and config.padded_vocab_size % 64 == 0
    assert set(PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    with pytest.raises(ValueError, match="unknown model preset 'gpt3'"):
        GPT2ScratchConfig.from_preset("gpt3")


@pytest.mark.parametrize("preset", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_parameter_counts_match_transformers(preset):
    """Each GPT-2 size has transformers' parameter count plus the vocabulary padding (built on the
    meta device, so no memory is used)."""
    sizes = PRESETS[preset]
    with torch.device("meta"):
        official = GPT2LMHeadModel(GPT2Config(**sizes))
        ours = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset(preset))
    if preset == "gpt2":
        assert official.num_parameters() == 124_439_808
    padding = (50304 - 50257) * sizes["n_embd"]
    assert ours.num_parameters() == official.num_parameters() + padding


def test_flops_per_token_counts_every_matmul():
    """6 FLOPs per parameter per token for each matmul weight, plus PaLM's attention term."""
    config = GPT2ScratchConfig.from_preset("gpt2")
    with torch.device("meta"):
        model = GPT2ScratchForCausalLM(config)
    n_matmul = model.num_parameters() - model.transformer.wpe.weight.numel()
    attention = 12 * config.n_layer * config.n_embd * 1024
    assert config.flops_per_token(1024) == 6 * n_matmul + attention


def test_init_follows_gpt2():
    torch.manual_seed(0)
    config = GPT2ScratchConfig.from_preset("cpu-mini", n_layer=4)
    model = GPT2ScratchForCausalLM(config)
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.count_nonzero(block.attn.c_attn.bias) == 0
    assert torch.all(block.ln_1.weight == 1)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert config.dropout == 0.0


def test_logits_and_loss_match_transformers(pair):
    official, ours = pair
    ids = random_ids(3, 20)
    with torch.no_grad():
        expected = official(ids, labels=ids)
        found = ours(ids, labels=ids)
    assert found.logits.shape == (3, 20, VOCAB)
    torch.testing.assert_close(found.logits, expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(found.loss, expected.loss, atol=1e-5, rtol=0)


def test_labels_ignore_index_and_shift_labels(pair):
    _, ours = pair
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        out = ours(ids, labels=labels)
        logits = out.logits[:, :-1].flatten(0, 1)
        expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)
        shifted = ours(ids[:, :-1], shift_labels=ids[:, 1:]).loss
    torch.testing.assert_close(out.loss, expected)
    # shift_labels: y already holds the next tokens, as the trainer's loader gives them.
    direct = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(shifted, direct, atol=1e-5, rtol=0)


def test_cached_forward_matches_uncached(pair):
    official, ours = pair
    ids = random_ids(2, 16)
    with torch.no_grad():
        full = ours(ids).logits
        first = ours(ids[:, :10], use_cache=True)
        step = ours(ids[:, 10:13], cache=first.past_key_values, use_cache=True)  # chunked prefill
        last = ours(ids[:, 13:14], cache=step.past_key_values, use_cache=True)
        official_last = official(ids[:, :14]).logits[:, -1]
    torch.testing.assert_close(step.logits, full[:, 10:13], atol=1e-5, rtol=0)
    torch.testing.assert_close(last.logits[:, -1], full[:, 13], atol=1e-5, rtol=0)
    torch.testing.assert_close(last.logits[:, -1], official_last, atol=1e-4, rtol=0)


def test_left_padding_matches_transformers_and_unpadded_rows(pair):
    official, ours = pair
    rows = [random_ids(1, n, seed=n)[0] for n in (5, 12, 9)]
    ids, mask, positions = left_padded(rows)
    with torch.no_grad():
        expected = official(ids, attention_mask=mask, position_ids=positions).logits
        found = ours(ids, attention_mask=mask).logits  # positions derived from the mask
        for i, row in enumerate(rows):
            alone = ours(row[None]).logits[0]
            torch.testing.assert_close(found[i, -len(row) :], alone, atol=1e-5, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(found[real], expected[real], atol=1e-4, rtol=0)
    assert torch.isfinite(found).all()


def test_right_padding_does_not_change_real_tokens(pair):
    _, ours = pair
    rows = [random_ids(1, n, seed=n)[0] for n in (4, 10)]
    ids = torch.full((2, 10), 50256)
    mask = torch.zeros(2, 10, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    with torch.no_grad():
        found = ours(ids, attention_mask=mask).logits
        alone = ours(rows[0][None]).logits[0]
    torch.testing.assert_close(found[0, :4], alone, atol=1e-5, rtol=0)


def test_greedy_generate_matches_transformers(pair):
    official, ours = pair
    prompt = random_ids(1, 6)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=50256)
    expected = official.generate(prompt, **kwargs)
    assert torch.equal(ours.generate(prompt, **kwargs), expected)
    assert torch.equal(ours.generate(prompt, use_cache=False, **kwargs), expected)


def test_batched_generate_with_left_padding_matches_transformers(pair):
    official, ours = pair
    ids, mask, _ = left_padded([random_ids(1, n, seed=n)[0] for n in (3, 7)])
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=50256)
    assert torch.equal(ours.generate(ids, **kwargs), official.generate(ids, **kwargs))


def test_sampling_is_seeded_and_stays_in_vocab(pair):
    _, ours = pair
    prompt = random_ids(2, 4)
    kwargs = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=10, pad_token_id=50256)
    torch.manual_seed(3)
    first = ours.generate(prompt, **kwargs)
    torch.manual_seed(3)
    assert torch.equal(first, ours.generate(prompt, **kwargs))
    assert first.shape == (2, 14) and int(first.max()) < VOCAB


def test_padded_vocab_never_leaks():
    """Even if the padding rows dominate, no padding token is ever returned or generated."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano")).eval()
    with torch.no_grad():
        model.transformer.wte.weight[VOCAB:] = 100.0  # padding rows would win every argmax
    ids = random_ids(2, 5)
    with torch.no_grad():
        assert model(ids).logits.shape[-1] == VOCAB
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=50256)
    assert int(generated.max()) < VOCAB


def test_round_trip_is_bit_exact(official_folder):
    official = GPT2LMHeadModel.from_pretrained(official_folder)
    back = to_gpt2(from_gpt2_model(official))
    expected, found = official.state_dict(), back.state_dict()
    assert set(found) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(found[key], tensor), key


def test_untied_checkpoint_keeps_its_own_head(tmp_path):
    """A GPT-2 checkpoint saved with `tie_word_embeddings=False` loads with its own head, not the embedding."""
    torch.manual_seed(0)
    official = GPT2LMHeadModel(GPT2Config(**TINY, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        official.lm_head.weight.normal_()  # unlike the embedding, so a head taken from it is caught
    official.save_pretrained(tmp_path)
    ours = from_gpt2(str(tmp_path)).eval()
    assert not ours.config.tie_word_embeddings
    assert ours.lm_head.weight is not ours.transformer.wte.weight
    ids = random_ids(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, official(ids).logits, atol=1e-4, rtol=0)
    back = to_gpt2(ours)
    assert torch.equal(back.lm_head.weight, official.lm_head.weight)


def test_from_gpt2_refuses_unsupported_variants(tmp_path):
    GPT2LMHeadModel(GPT2Config(**TINY, activation_function="relu")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="activation_function='relu'"):
        from_gpt2(str(tmp_path))


def test_gradient_checkpointing_recomputes_each_block_and_gives_same_gradients():
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano")).train()
    ids = random_ids(2, 16)
    # The block's body (checkpointing wraps it, not the block's own call): its attention runs once per pass.
    blocks, forwards = list(model.transformer.h), []
    for block in blocks:
        block.attn.register_forward_hook(lambda module, args, output, block=block: forwards.append(block))

    def grads():
        forwards.clear()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = grads()
    assert forwards == blocks  # each block once: nothing recomputed
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # the trainer's
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    # each block forward again during the backward pass, the last block's first: its activations were dropped
    assert forwards == blocks + blocks[::-1]
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_training_forward_compiles_without_graph_breaks():
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano")).train()
    ids = random_ids(2, 16)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids, shift_labels=ids, loss_only=True)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    expected = model(ids, shift_labels=ids, loss_only=True).loss
    torch.testing.assert_close(compiled(ids, shift_labels=ids, loss_only=True).loss, expected)


def test_bf16_autocast_forward_and_backward():
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano")).train()
    ids = random_ids(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert model.transformer.wte.weight.grad.dtype == torch.float32
    assert torch.isfinite(model.transformer.wte.weight.grad).all()


def test_save_and_load_pretrained_in_safetensors(tmp_path):
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano"))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "modeling_gpt2_scratch.py").exists()  # remote code travels with the weights
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.auto_map["AutoModelForCausalLM"] == "modeling_gpt2_scratch.GPT2ScratchForCausalLM"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is GPT2ScratchForCausalLM
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


FRESH_PROCESS_LOAD = """
import sys
import torch
from transformers import AutoModelForCausalLM
{setup}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], {kwargs})
ids = torch.tensor([[464, 2068, 7586, 21831]])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[2])
print(type(model).__module__, type(model).__name__)
"""


@pytest.mark.parametrize(
    "setup, kwargs, module",
    [
        ("", "trust_remote_code=True", "transformers_modules"),  # a process that cannot import this project
        ("import modeling_gpt2_scratch", "", "modeling_gpt2_scratch"),  # registered on import
    ],
)
def test_auto_model_loads_in_fresh_process(tmp_path, setup, kwargs, module):
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano")).eval()
    model.save_pretrained(tmp_path / "model")
    script = FRESH_PROCESS_LOAD.format(setup=setup, kwargs=kwargs)
    argv = [str(tmp_path / "model"), str(tmp_path / "logits.pt")]
    if setup:  # run from the repository, which puts the project on the path
        cwd = Path(__file__).resolve().parents[1]
        result = subprocess.run(
            [sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=cwd, timeout=300
        )
    else:
        result = run_clean(script, *argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0].startswith(module) and result.stdout.split()[1] == "GPT2ScratchForCausalLM"
    with torch.no_grad():
        expected = model(torch.tensor([[464, 2068, 7586, 21831]])).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected)


@pytest.mark.slow
def test_round_trip_at_full_gpt2_size(tmp_path):
    """The 124M model: official layout -> ours -> official, bit for bit, and the same logits."""
    torch.manual_seed(0)
    official = GPT2LMHeadModel(GPT2Config()).eval()
    ours = from_gpt2_model(official).eval()
    back = to_gpt2(ours)
    for key, tensor in official.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    ids = random_ids(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, official(ids).logits, atol=1e-4, rtol=0)


def test_num_items_in_batch_divides_the_summed_loss():
    """transformers' Trainer passes `num_items_in_batch` under gradient accumulation and then does not
    divide by the number of micro-batches itself: the model must return sum / num_items_in_batch."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano"))
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        logits = model.eval()(ids).logits
    summed = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )
    for loss_only in (False, True):  # the plain path and the chunked training path
        loss = model(ids, labels=labels, num_items_in_batch=40, loss_only=loss_only).loss
        torch.testing.assert_close(loss, summed / 40, atol=1e-5, rtol=1e-5)
        shifted = model(ids[:, :-1], shift_labels=labels[:, 1:], num_items_in_batch=40, loss_only=loss_only).loss
        torch.testing.assert_close(shifted, summed / 40, atol=1e-5, rtol=1e-5)


def test_hf_trainer_gradient_accumulation_equals_one_batch(tmp_path):
    """Under transformers' Trainer, 4 micro-batches of 2 give the loss and gradient norm of one batch of 8."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = Dataset.from_dict({"input_ids": random_ids(8, 16).tolist()}).map(lambda r: {"labels": r["input_ids"]})

    def first_step(batch_size, accumulation):
        torch.manual_seed(0)
        model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano"))
        args = TrainingArguments(
            output_dir=str(tmp_path / f"ga{accumulation}"),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=0.0,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        return next(log for log in trainer.state.log_history if "grad_norm" in log)

    one, accumulated = first_step(8, 1), first_step(2, 4)
    assert accumulated["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert accumulated["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)


def test_chunked_training_loss_in_a_bf16_model():
    """A model cast to bf16 (no autocast) trains through the chunked loss, close to the plain path."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-nano")).to(torch.bfloat16).train()
    ids = random_ids(2, 16)
    chunked = model(ids[:, :-1], shift_labels=ids[:, 1:], loss_only=True).loss
    chunked.backward()
    grad = model.transformer.wte.weight.grad.clone()
    model.zero_grad()
    plain = model(ids, labels=ids).loss
    plain.backward()
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(chunked, plain, atol=2e-2, rtol=0)
    torch.testing.assert_close(grad.float(), model.transformer.wte.weight.grad.float(), atol=2e-3, rtol=5e-2)
