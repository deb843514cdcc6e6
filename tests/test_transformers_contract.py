"""transformers' own common tests, run against `GPT2ScratchForCausalLM`: the contract a user of
transformers relies on (`ModelTesterMixin`, the config tester and `PipelineTesterMixin`, from the sdist of
the installed transformers version; see `transformers_suite.py`).

The module skips, with the reason, where the files cannot be had (offline, no pip). The tests that do
not apply to a causal GPT-2 are deselected in `NOT_APPLICABLE`, each with its reason.
"""

import unittest

import pytest
import torch
from transformers_standins import GenerationTesterMixin
from transformers_suite import TransformersTestsUnavailable, load_transformers_tests

from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

try:
    suite = load_transformers_tests()
except TransformersTestsUnavailable as err:
    pytest.skip(f"transformers' test files are not available: {err}", allow_module_level=True)

common = suite["test_modeling_common"]
ids_tensor, random_attention_mask = common.ids_tensor, common.random_attention_mask


class GPT2ScratchModelTester:
    """GPT-2's model tester (transformers' `GPT2ModelTester`: batch 14 of 7 tokens, vocabulary 99, 2 layers,
    32 wide, 4 heads), mapped onto our config. The sdist does not ship `tests/models/gpt2/`, so this is
    ours, in the same shape."""

    def __init__(self, parent, batch_size=14, seq_length=7, is_training=True):
        self.parent, self.batch_size, self.seq_length, self.is_training = parent, batch_size, seq_length, is_training
        self.vocab_size, self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 99, 32, 2, 4
        self.max_position_embeddings = 512
        self.pad_vocab_multiple = 64  # ours: the 99 rows padded to 128

    def get_config(self) -> GPT2ScratchConfig:
        return GPT2ScratchConfig(
            vocab_size=self.vocab_size,
            n_embd=self.hidden_size,
            n_layer=self.num_hidden_layers,
            n_head=self.num_attention_heads,
            n_positions=self.max_position_embeddings,
            pad_vocab_multiple=self.pad_vocab_multiple,
            bos_token_id=self.vocab_size - 1,
            eos_token_id=self.vocab_size - 1,
            pad_token_id=self.vocab_size - 1,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class GPT2ScratchModelTest(common.ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (GPT2ScratchForCausalLM,)

    def setUp(self):
        self.model_tester = GPT2ScratchModelTester(self)
        # GPT-2's config tester uses n_embd=37; ours requires n_embd divisible by n_head (12 by default).
        self.config_tester = suite["test_configuration_common"].ConfigTester(
            self, config_class=GPT2ScratchConfig, n_embd=36
        )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # transformers adds labels for the causal LMs of its own mapping (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`),
        # which a model registered at run time is not in: the same labels for ours.
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            inputs_dict["labels"] = torch.zeros_like(inputs_dict["input_ids"])
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    # transformers' resize tests count the rows of the embedding matrix as `vocab_size`; ours keeps the
    # matrix padded to `pad_vocab_multiple` (64 here: 99 tokens in 128 rows). With no padding
    # (`pad_vocab_multiple=1`) the two agree and the tests check transformers' resize on our model; the
    # padded resize is checked against GPT2LMHeadModel in tests/test_model_contract.py.
    def test_resize_tokens_embeddings(self):
        self.model_tester.pad_vocab_multiple = 1
        super().test_resize_tokens_embeddings()

    def test_resize_embeddings_untied(self):
        self.model_tester.pad_vocab_multiple = 1
        super().test_resize_embeddings_untied()
