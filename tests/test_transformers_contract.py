"""transformers' own common tests, run against `GPT2ScratchForCausalLM`: the contract a user of
transformers relies on (`ModelTesterMixin`, the config tester and `PipelineTesterMixin`, from the sdist of
the installed transformers version; see `transformers_suite.py`).

The module skips, with the reason, where the files cannot be had (offline, no pip). The tests that do
not apply to a causal GPT-2 are deselected in `NOT_APPLICABLE`, each with its reason.
"""

import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from transformers_standins import GenerationTesterMixin
from transformers_suite import TransformersTestsUnavailable, load_transformers_tests

import modeling_gpt2_scratch
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

try:
    suite = load_transformers_tests()
except TransformersTestsUnavailable as err:
    pytest.skip(f"transformers' test files are not available: {err}", allow_module_level=True)

common, pipeline_mixin = suite["test_modeling_common"], suite["test_pipeline_mixin"]
ids_tensor, random_attention_mask = common.ids_tensor, common.random_attention_mask

# The tests of transformers' mixins that do not apply to a causal GPT-2, with the reason: deselected by
# tests/conftest.py (`pytest_collection_modifyitems`). Everything else runs, or skips with the mixin's reason.
NOT_APPLICABLE = {
    "test_torch_save_load": "saves the base model of MODEL_MAPPING (AutoModel); ours has the LM class only",
    "test_reverse_loading_mapping": "transformers' key renames for its own checkpoints (conversion_mapping); "
    "official GPT-2 checkpoints load through conversion.from_gpt2 (tests/test_model.py)",
    "test_can_load_from_already_mapped_keys": "the same key renames (conversion_mapping)",
    "test_model_rope_scaling_from_config": "RoPE: GPT-2 learns absolute positions",
    "test_model_rope_scaling_frequencies": "RoPE: GPT-2 learns absolute positions",
    "test_model_rope_with_partial_rotation": "RoPE: GPT-2 learns absolute positions",
    "test_vision_axial_rope": "RoPE of vision models",
    "test_moe_models_record_router_logits": "mixture of experts: GPT-2 has none",
    "test_output_router_logits_from_config": "mixture of experts: GPT-2 has none",
    "test_encoder_decoder_loss_no_double_shift": "encoder-decoder models",
    "test_attn_implementation_composite_models": "composite models (sub-configs); ours has one config",
    "test_sdpa_can_dispatch_composite_models": "composite models (sub-configs); ours has one config",
    "test_can_set_attention_dynamically_composite_model": "composite models (sub-configs); ours has one config",
    "test_internal_model_config_and_subconfig_are_same": "composite models (sub-configs); ours has one config",
    "test_sliding_window_mask": "sliding-window attention: GPT-2 attends to its whole context",
    "test_capture_outputs_decorator": "transformers' `capture_outputs` hooks, which ours does not use: it returns "
    "hidden states and attentions itself (tests/test_model_contract.py)",
    **{
        f"test_get_{kind}_features_{what}": "multimodal feature extractors"
        for kind in ("image", "audio", "video")
        for what in ("output", "pooler_output", "hidden_states", "attentions")
    },
    **{
        name: "a pipeline task other than text generation, the one a causal LM serves"
        for name in dir(pipeline_mixin.PipelineTesterMixin)
        if name.startswith("test_pipeline_") and not name.startswith("test_pipeline_text_generation")
    },
}


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
    # transformers runs this for models from 2023 on (told by the copyright line, which ours lacks) and for
    # the older ones it has fixed: every weight must be set by `_init_weights`.
    test_can_init_all_missing_weights_before_2023 = True

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

    def test_causal_lm_loss_honors_shift_labels(self):
        # transformers picks the causal LMs of its own mapping; ours is one too.
        names = {**common.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "gpt2_scratch": "GPT2ScratchForCausalLM"}
        with mock.patch.object(common, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", names):
            super().test_causal_lm_loss_honors_shift_labels()

    def test_can_capture_specific_layers_hidden_states(self):
        # The test runs for models that declare transformers' capture hooks (`_can_record_outputs`); ours selects
        # the hidden states in `forward` itself, so it is declared for this test only, which checks the selection.
        hooks = {"hidden_states": modeling_gpt2_scratch.GPT2ScratchBlock}
        with mock.patch.object(GPT2ScratchForCausalLM, "_can_record_outputs", hooks):
            super().test_can_capture_specific_layers_hidden_states()

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


class GPT2ScratchPipelineTest(pipeline_mixin.PipelineTesterMixin, unittest.TestCase):
    """transformers' `PipelineTesterMixin` on the text-generation pipeline: it loads a tiny model of ours and
    GPT-2's tokenizer from a local folder (`TRANSFORMERS_TINY_MODEL_PATH`'s layout, as transformers' own
    CI makes with `utils/create_dummy_models.py`) instead of the Hub's tiny models."""

    pipeline_model_mapping = {"text-generation": GPT2ScratchForCausalLM}

    @classmethod
    def setUpClass(cls):
        from data_prep.tokenizer import load_hf_tokenizer

        cls.folder = tempfile.TemporaryDirectory()
        repo = Path(cls.folder.name) / GPT2ScratchConfig.model_type / GPT2ScratchForCausalLM.__name__
        torch.manual_seed(0)
        config = GPT2ScratchConfig.from_preset("cpu-nano", pad_token_id=50256)
        GPT2ScratchForCausalLM(config).save_pretrained(repo)
        tokenizer = load_hf_tokenizer(model_max_length=config.n_positions)
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2's usual choice; the mixin batches only with one
        tokenizer.save_pretrained(repo)
        cls.patch = mock.patch.object(pipeline_mixin, "TRANSFORMERS_TINY_MODEL_PATH", cls.folder.name)
        cls.patch.start()

    @classmethod
    def tearDownClass(cls):
        cls.patch.stop()
        cls.folder.cleanup()


def test_module_skips_with_its_reason_where_the_sdist_cannot_be_had(tmp_path):
    """Offline (here: pip with no index) and nothing cached: the whole module skips, saying why."""
    env = {**os.environ, "GPT2_SCRATCH_CACHE": str(tmp_path), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-rs", "-p", "no:cacheprovider", "-n", "0"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    # a module skipped while it is collected leaves no test to run: pytest's exit status 5
    assert result.returncode == 5 and "1 skipped" in result.stdout, result.stdout[-2000:]
    assert "transformers' test files are not available: `pip download` of the transformers==" in result.stdout
    assert not (tmp_path / "transformers-tests" / transformers.__version__ / "tests").exists()
