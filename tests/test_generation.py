"""`generate()` against `GPT2LMHeadModel`'s on the same weights: transformers' generation tests
(`tests/generation/test_utils.py`) are not in its source distribution, so these stand in for them."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2_scratch.conversion import from_gpt2_model

VOCAB, PAD = 99, 98
SIZES = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=VOCAB, bos_token_id=PAD, eos_token_id=PAD)


@pytest.fixture(scope="module")
def pair():
    """transformers' GPT-2 (eager attention, so that it returns weights) and ours, the same weights."""
    torch.manual_seed(0)
    official = GPT2LMHeadModel(GPT2Config(**SIZES, attn_implementation="eager")).eval()
    return official, from_gpt2_model(official).eval()


def prompts(lengths=(4, 7), seed=1):
    """Left-padded prompts (input_ids, attention_mask) of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(0, PAD, (n,), generator=generator)
        mask[row, -n:] = 1
    return ids, mask


def both(pair, seed=None, **kwargs):
    """The same `generate` call on both models, each after the same seed."""
    out = []
    for model in pair:
        if seed is not None:
            torch.manual_seed(seed)
        out.append(model.generate(pad_token_id=PAD, **kwargs))
    return out


@pytest.mark.parametrize("lengths", [(6,), (3, 7, 5)])
def test_greedy(pair, lengths):
    ids, mask = prompts(lengths)
    expected, found = both(pair, input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert found.shape == (len(lengths), ids.shape[1] + 10)
    assert torch.equal(found, expected)


def test_seeded_sampling(pair):
    ids, mask = prompts((4, 7))
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9)
    expected, found = both(pair, seed=11, temperature=0.8, **kwargs)
    assert torch.equal(found, expected)
    (again,) = both(pair[1:], seed=11, temperature=0.8, **kwargs)
    (other,) = both(pair[1:], seed=12, temperature=0.8, **kwargs)
    assert torch.equal(again, found) and not torch.equal(other, found)


def test_beam_search(pair):
    ids, mask = prompts((5, 3))
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=2)
    expected, found = both(pair, return_dict_in_generate=True, output_scores=True, **kwargs)
    assert found.sequences.shape[0] == 4
    assert torch.equal(found.sequences, expected.sequences)
    torch.testing.assert_close(found.sequences_scores, expected.sequences_scores, atol=1e-4, rtol=0)


def test_scores_and_logits(pair):
    ids, mask = prompts((4, 6))
    expected, found = both(
        pair,
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    assert torch.equal(found.sequences, expected.sequences)
    assert len(found.scores) == len(found.logits) == 5
    for mine, theirs in zip(found.scores + found.logits, expected.scores + expected.logits, strict=True):
        assert mine.shape == (2, VOCAB)  # the padding columns never reach generate
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)


def test_hidden_states_and_attentions_per_step(pair):
    ids, mask = prompts((4, 6))
    expected, found = both(
        pair,
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=4,
        do_sample=False,
        return_dict_in_generate=True,
        output_hidden_states=True,
        output_attentions=True,
    )
    assert len(found.hidden_states) == len(found.attentions) == 4  # one entry per step
    real = mask.bool()
    for step, (mine, theirs) in enumerate(zip(found.hidden_states, expected.hidden_states, strict=True)):
        assert len(mine) == 3  # n_layer + 1
        for a, b in zip(mine, theirs, strict=True):
            a, b = (a[real], b[real]) if step == 0 else (a, b)  # the prompt step: real tokens only
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    for step, (mine, theirs) in enumerate(zip(found.attentions, expected.attentions, strict=True)):
        for a, b in zip(mine, theirs, strict=True):
            assert a.shape == b.shape  # (B, nh, T, S): the prompt, then one query over the cache
            if step == 0:
                a, b = a.transpose(1, 2)[real], b.transpose(1, 2)[real]
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_selected_hidden_states_per_step(pair):
    ids, mask = prompts((4, 6))
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    expected, found = both(pair, return_dict_in_generate=True, output_hidden_states=[0, -1], **kwargs)
    assert torch.equal(found.sequences, expected.sequences)
    for mine, theirs in zip(found.hidden_states, expected.hidden_states, strict=True):
        assert [h is None for h in mine] == [h is None for h in theirs] == [False, True, False]
        torch.testing.assert_close(mine[-1][:, -1], theirs[-1][:, -1], atol=1e-4, rtol=0)


def test_inputs_embeds(pair):
    official, ours = pair
    ids, mask = prompts((5, 3))
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        expected = official.generate(inputs_embeds=official.transformer.wte(ids), **kwargs)
        found = ours.generate(inputs_embeds=ours.transformer.wte(ids), **kwargs)
    assert found.shape == (2, 6)  # with inputs_embeds only the new tokens come back, as for GPT-2
    assert torch.equal(found, expected)
    assert torch.equal(found, ours.generate(input_ids=ids, **kwargs)[:, ids.shape[1] :])


def test_left_padded_rows_generate_as_alone(pair):
    _, ours = pair
    ids, mask = prompts((3, 7))
    batched = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    alone = ours.generate(input_ids=ids[:1, -3:], max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    assert torch.equal(batched[0, -11:], alone[0])
