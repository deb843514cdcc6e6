"""Our HF export in lm-evaluation-harness's `hf` model type gives the log-likelihoods we compute.

lm-eval runs in a process that cannot import this project (tests/clean_interpreter.py), so the model
class comes from the remote code saved in the folder (`trust_remote_code=True`), as on a user's machine.
"""

from __future__ import annotations

import json

import pytest
from clean_interpreter import run_clean
from test_eval_common import hellaswag_records, tiny_gpt2

from data_prep.tokenizer import save_hf_tokenizer
from eval.common import load_model
from eval.hellaswag import evaluate_hellaswag
from gpt2_scratch.conversion import from_gpt2_model

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install -e '.[eval]'")

# What `lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True` builds, asked for the
# log-likelihood of each ending given its context (the requests of a multiple-choice task).
SCRIPT = """
import json
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

folder, requests = sys.argv[1], json.loads(sys.argv[2])
lm = get_model("hf").create_from_arg_string(
    f"pretrained={folder},trust_remote_code=True,dtype=float32", {"device": "cpu", "batch_size": 4}
)
instances = [Instance("loglikelihood", doc={}, arguments=tuple(r), idx=i) for i, r in enumerate(requests)]
loglikelihoods = [ll for ll, _ in lm.loglikelihood(instances)]
print(json.dumps({"module": type(lm.model).__module__, "loglikelihoods": loglikelihoods}))
"""


def test_lm_eval_hf_model_matches_our_scoring(tmp_path):
    folder = tmp_path / "export"
    model = from_gpt2_model(tiny_gpt2())
    model.save_pretrained(folder)
    save_hf_tokenizer(folder, model_max_length=model.config.n_positions)
    examples = hellaswag_records()[:3]
    requests = [(ex["ctx"], " " + ending) for ex in examples for ending in ex["endings"]]

    proc = run_clean(SCRIPT, str(folder), json.dumps(requests), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    harness = json.loads(proc.stdout.strip().splitlines()[-1])
    assert harness["module"].startswith("transformers_modules.")  # the folder's remote code

    ours = evaluate_hellaswag(load_model(str(folder)), examples, return_predictions=True)["predictions"]
    assert harness["loglikelihoods"] == pytest.approx([-loss for p in ours for loss in p["losses"]], rel=1e-4)
