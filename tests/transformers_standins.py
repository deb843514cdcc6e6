"""Ours: the smallest stand-ins for the pieces of transformers' test tree that its source distribution
lacks and that its `test_modeling_common.py`, `test_configuration_common.py` and `test_pipeline_mixin.py`
import. `transformers_suite.load_transformers_tests` installs this one module under each missing name
(`tests.generation.test_utils`, `tests.exporters.test_export`, `tests.utils.test_configuration_utils`,
`tests.pipelines.test_pipelines_text_generation`). None of it is transformers' code.
"""

from __future__ import annotations

import torch


class GenerationTesterMixin:
    """Stands in for transformers' `tests/generation/test_utils.py`, absent from its sdist.

    transformers' `test_generation_tester_mixin_inheritance` asks every model that can generate to inherit
    this mixin. Its tests are not in the sdist; `tests/test_generation.py` compares our `generate()` with
    `GPT2LMHeadModel`'s on the same weights instead (greedy, sampling, beams, scores, hidden states,
    `inputs_embeds`, left padding)."""


class ExportTesterMixin:
    """Stands in for transformers' `tests/exporters/test_export.py` (`torch.export` tests), absent from its
    sdist. It adds no tests; `tests/test_model.py` checks that the training forward compiles in one graph."""


# Stands in for `config_common_kwargs` of transformers' `tests/utils/test_configuration_utils.py`: a value
# other than the default for each field that every `PreTrainedConfig` of transformers 5 has, so that
# `ConfigTester.check_config_arguments_init` checks that our config passes each one through.
config_common_kwargs = {
    "output_hidden_states": True,
    "return_dict": False,
    "dtype": torch.float16,
    "chunk_size_feed_forward": 5,
    "architectures": ["GPT2ScratchForCausalLM"],
    "id2label": {0: "negative", 1: "positive"},
    "label2id": {"negative": 0, "positive": 1},
    "problem_type": "single_label_classification",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}


class TextGenerationPipelineTests:
    """Stands in for `TextGenerationPipelineTests` of transformers' `tests/pipelines/test_pipelines_text_generation.py`,
    absent from its sdist: the two methods `PipelineTesterMixin.run_pipeline_test` calls. The pipeline must
    return, for each prompt, text that starts with the prompt and goes on (greedy, so the same twice), and
    honour `return_full_text=False` and `num_return_sequences`."""

    def get_test_pipeline(self, model, tokenizer=None, dtype="float32", **processors):
        from transformers import TextGenerationPipeline

        pipe = TextGenerationPipeline(model=model, tokenizer=tokenizer, dtype=dtype, max_new_tokens=5)
        return pipe, ["This is a test", "Another test"]

    def run_pipeline_test(self, text_generator, examples):
        assert text_generator.model.config.pad_token_id is not None or text_generator.tokenizer.pad_token_id is not None
        kwargs = dict(do_sample=False, max_new_tokens=5)
        for prompt in examples:
            (full,) = text_generator(prompt, **kwargs)
            assert full["generated_text"].startswith(prompt) and len(full["generated_text"]) > len(prompt)
            assert text_generator(prompt, **kwargs) == [full]
            (new,) = text_generator(prompt, return_full_text=False, **kwargs)
            assert prompt + new["generated_text"] == full["generated_text"]
        outputs = text_generator(examples, num_return_sequences=2, num_beams=2, **kwargs)
        assert [len(per_prompt) for per_prompt in outputs] == [2, 2]
        assert all(out["generated_text"].startswith(p) for p, per in zip(examples, outputs, strict=True) for out in per)
