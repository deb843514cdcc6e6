"""What a transformers user asks of a causal LM, answered as `GPT2LMHeadModel` answers it on the same
weights (issue 28): hidden states, attention weights (an eager path, only when asked for), tuple outputs,
`inputs_embeds`, `token_type_ids`, `resize_token_embeddings` (and what survives it: save/load, the
official-layout export)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import modeling_gpt2_scratch
from gpt2_scratch import export_gpt2
from gpt2_scratch.conversion import from_gpt2_model, to_gpt2
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

VOCAB = 99  # GPT-2's model tester's; padded to 128 rows in ours
SIZES = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=VOCAB, bos_token_id=98, eos_token_id=98)


def official_model(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**SIZES, **overrides})).eval()


@pytest.fixture(scope="module")
def pair():
    """transformers' GPT-2 and ours with the same weights, in eval mode."""
    official = official_model()
    return official, from_gpt2_model(official).eval()


@pytest.fixture(scope="module")
def batch():
    """Two rows, the second left-padded by 3, and GPT-2's position ids for them (it does not derive them)."""
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))


def test_hidden_states_are_gpt2s(pair, batch):
    official, ours = pair
    with torch.no_grad():
        expected = official(**batch, output_hidden_states=True)
        found = ours(**batch, output_hidden_states=True)
    assert len(found.hidden_states) == ours.config.n_layer + 1 == len(expected.hidden_states)
    real = batch["attention_mask"].bool()
    for layer, (mine, theirs) in enumerate(zip(found.hidden_states, expected.hidden_states, strict=True)):
        torch.testing.assert_close(mine[real], theirs[real], atol=1e-5, rtol=0, msg=f"hidden state {layer}")
    # the last is after ln_f: the logits are its projection
    torch.testing.assert_close(found.logits, ours.lm_head(found.hidden_states[-1])[..., :VOCAB])
    assert ours(**batch).hidden_states is None  # not asked for, not kept


@pytest.mark.parametrize("selection", [[0, -1], 2, [1, 1]])
def test_selected_hidden_states_are_gpt2s(pair, batch, selection):
    official, ours = pair
    with torch.no_grad():
        expected = official(**batch, output_hidden_states=selection).hidden_states
        found = ours(**batch, output_hidden_states=selection).hidden_states
        every = ours(**batch, output_hidden_states=True).hidden_states
    assert [h is None for h in found] == [h is None for h in expected] and any(h is not None for h in found)
    for mine, all_of_them in zip(found, every, strict=True):
        assert mine is None or torch.equal(mine, all_of_them)


def test_attention_weights_are_gpt2s_eager_ones(pair, batch):
    official, ours = pair
    official.set_attn_implementation("eager")  # GPT-2 returns no weights from SDPA
    try:
        with torch.no_grad():
            expected = official(**batch, output_attentions=True).attentions
            found = ours(**batch, output_attentions=True)
    finally:
        official.set_attn_implementation("sdpa")
    assert ours.config._attn_implementation == "sdpa"  # asked for per call, the default stays SDPA
    assert len(found.attentions) == ours.config.n_layer
    real = batch["attention_mask"].bool()
    for mine, theirs in zip(found.attentions, expected, strict=True):
        assert mine.shape == (2, 2, 9, 9)  # (B, nh, T, S)
        # real query rows; each sums to 1 over real keys only
        torch.testing.assert_close(mine.transpose(1, 2)[real], theirs.transpose(1, 2)[real], atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.sum(-1)[0], torch.ones(2, 9))
        assert torch.all(mine[1, :, 3:, :3] == 0)  # padding keys get no weight
    with torch.no_grad():
        plain = ours(**batch)
    torch.testing.assert_close(found.logits, plain.logits, atol=1e-5, rtol=0)
    assert plain.attentions is None


def test_sdpa_stays_the_path_unless_eager_is_asked_for(pair, batch, monkeypatch):
    _, ours = pair
    calls = []
    real_eager = modeling_gpt2_scratch.eager_attention

    def counting(*args):
        calls.append(1)
        return real_eager(*args)

    monkeypatch.setattr(modeling_gpt2_scratch, "eager_attention", counting)
    with torch.no_grad():
        sdpa = ours(**batch, labels=batch["input_ids"])
        assert calls == []  # inference, with the hidden states too
        ours(**batch, output_hidden_states=True)
        assert calls == []
        ours.train()
        ours(batch["input_ids"], shift_labels=batch["input_ids"], loss_only=True)  # the trainer's call
        ours.eval()
        assert calls == []
        ours.set_attn_implementation("eager")
        try:
            assert ours.config._attn_implementation == "eager"
            eager = ours(**batch, labels=batch["input_ids"])
        finally:
            ours.set_attn_implementation("sdpa")
    assert len(calls) == ours.config.n_layer and eager.attentions is None
    torch.testing.assert_close(eager.logits, sdpa.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(eager.loss, sdpa.loss, atol=1e-6, rtol=0)


def test_attn_implementation_eager_from_pretrained(pair, batch, tmp_path, monkeypatch):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    model = GPT2ScratchForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert model.config._attn_implementation == "eager"
    calls = []
    real_eager = modeling_gpt2_scratch.eager_attention
    monkeypatch.setattr(modeling_gpt2_scratch, "eager_attention", lambda *a: calls.append(1) or real_eager(*a))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ours(**batch).logits, atol=1e-5, rtol=0)
    assert len(calls) == model.config.n_layer
    with pytest.raises((ValueError, ImportError), match="[Ff]lash"):
        model.set_attn_implementation("flash_attention_2")  # not implemented: refused, not ignored


def test_return_dict_false_gives_gpt2s_tuple(pair, batch):
    official, ours = pair
    # GPT-2's logits at padding positions differ from ours (no one reads them), so nothing predicted from one counts
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[1, 3] = -100  # the first real token of the left-padded row is predicted from padding
    kwargs = dict(labels=labels, use_cache=False, return_dict=False)
    with torch.no_grad():
        expected, found = official(**batch, **kwargs), ours(**batch, **kwargs)
    assert type(found) is tuple and len(found) == len(expected) == 2  # (loss, logits)
    real = batch["attention_mask"].bool()
    expected, found = (expected[0], expected[1][real]), (found[0], found[1][real])
    for mine, theirs in zip(found, expected, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    with torch.no_grad():
        with_all = ours(**batch, output_hidden_states=True, output_attentions=True, return_dict=False)
    assert len(with_all) == 4  # logits, cache, hidden states, attentions


def test_config_return_dict_and_output_flags(pair, batch, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    model = GPT2ScratchForCausalLM.from_pretrained(tmp_path, return_dict=False, output_hidden_states=True).eval()
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    assert type(out) is tuple and len(out) == 2 and len(out[1]) == model.config.n_layer + 1


def test_inputs_embeds_match_input_ids_and_gpt2(pair, batch):
    official, ours = pair
    ids = batch["input_ids"]
    with torch.no_grad():
        from_ids = ours(**batch).logits
        mine = ours(inputs_embeds=ours.transformer.wte(ids), attention_mask=batch["attention_mask"]).logits
        theirs = official(
            inputs_embeds=official.transformer.wte(ids),
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
    torch.testing.assert_close(mine, from_ids)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(mine[real], theirs[real], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        ours(ids, inputs_embeds=ours.transformer.wte(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        ours()


def test_token_type_ids_are_embedded_as_gpt2_does(pair, batch):
    official, ours = pair
    token_types = torch.zeros_like(batch["input_ids"])
    token_types[:, 5:] = 1
    with torch.no_grad():
        expected = official(**batch, token_type_ids=token_types).logits
        found = ours(**batch, token_type_ids=token_types).logits
        without = ours(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(found[real], expected[real], atol=1e-4, rtol=0)
    assert (found - without).abs().max() > 0.1  # the segment ids change the logits, as in GPT-2


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("mean_resizing", [True, False])
def test_resize_token_embeddings_matches_gpt2_and_keeps_padding(tied, mean_resizing):
    torch.manual_seed(0)
    config = GPT2ScratchConfig(**SIZES, tie_word_embeddings=tied)
    ours = GPT2ScratchForCausalLM(config).eval()  # its 29 padding rows random: the new rows must not see them
    official = to_gpt2(ours)
    assert ours.transformer.wte.weight.shape[0] == 128
    torch.manual_seed(7)
    official.resize_token_embeddings(109, mean_resizing=mean_resizing)
    torch.manual_seed(7)
    embedding = ours.resize_token_embeddings(109, mean_resizing=mean_resizing)
    assert embedding is ours.get_input_embeddings()
    assert ours.config.vocab_size == 109 and ours.config.padded_vocab_size == 128
    assert ours.transformer.wte.weight.shape == (128, 32)  # still padded to a multiple of 64
    assert torch.equal(ours.transformer.wte.weight[:109], official.transformer.wte.weight)
    assert torch.count_nonzero(ours.transformer.wte.weight[109:]) == 0
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == tied
    assert torch.equal(ours.lm_head.weight[:109], official.lm_head.weight)
    ids = torch.tensor([[5, 100, 108, 7, 104]])  # new tokens among them
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, official(ids).logits, atol=1e-4, rtol=0)
    back = to_gpt2(ours)  # the official layout drops the padding rows
    assert back.transformer.wte.weight.shape == (109, 32) and torch.equal(back.lm_head.weight, official.lm_head.weight)

    ours.resize_token_embeddings(90)  # shrinking keeps the first rows
    assert ours.transformer.wte.weight.shape == (128, 32) and ours.config.vocab_size == 90
    assert torch.equal(ours.transformer.wte.weight[:90], official.transformer.wte.weight[:90])
    ours.resize_token_embeddings(130, pad_to_multiple_of=32)  # sets the multiple
    assert ours.transformer.wte.weight.shape == (160, 32) and ours.config.pad_vocab_multiple == 32
    assert ours.lm_head.out_features == 160 and ours(ids).logits.shape == (1, 5, 130)


def test_resized_model_survives_save_load_and_the_official_export(tmp_path):
    official = official_model()
    ours = from_gpt2_model(official).eval()
    torch.manual_seed(3)
    official.resize_token_embeddings(109)
    torch.manual_seed(3)
    ours.resize_token_embeddings(109)
    ours.save_pretrained(tmp_path / "resized")
    loaded = GPT2ScratchForCausalLM.from_pretrained(tmp_path / "resized").eval()
    assert loaded.transformer.wte.weight.shape == (128, 32) and loaded.config.vocab_size == 109
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.tensor([[5, 100, 108, 7, 104]])
    with torch.no_grad():
        expected = official(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-4, rtol=0)
    (folder,) = export_gpt2.export(tmp_path / "resized")
    exported = GPT2LMHeadModel.from_pretrained(folder).eval()
    assert exported.config.vocab_size == 109 and exported.transformer.wte.weight.shape == (109, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, expected, atol=1e-4, rtol=0)
