"""Two processes (`accelerate launch`, gloo on CPU) give the same HellaSwag and val-loss totals as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_eval_common import random_tokens, tiny_gpt2, tiny_gpt2_folder, write_hellaswag, write_shards
from trainer_runs import reserved_port

from eval.hellaswag import evaluate_hellaswag, load_examples
from eval.val_loss import evaluate_val_loss

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from accelerate import Accelerator
from eval.common import load_model
from eval.hellaswag import evaluate_hellaswag, load_examples
from eval.val_loss import evaluate_val_loss

model_dir, hellaswag_file, data_dir, out_dir = sys.argv[1:]
accelerator = Accelerator(cpu=True)
model = load_model(model_dir, device=accelerator.device)
hs = evaluate_hellaswag(model, load_examples(hellaswag_file), batch_size=2, accelerator=accelerator,
                        return_predictions=True)
loss = evaluate_val_loss(model, data_dir, batch_size=2, seq_len=16, accelerator=accelerator)
result = {"world": accelerator.num_processes, "hellaswag": hs, "val_loss": loss}
with open(f"{out_dir}/rank{accelerator.process_index}.json", "w") as f:
    json.dump(result, f)
accelerator.wait_for_everyone()
accelerator.end_training()  # the process group goes down before the interpreter, or gloo may abort a rank
"""


def test_two_processes_equal_one(tmp_path):
    model_dir = tiny_gpt2_folder(tmp_path / "model")
    hellaswag_file = write_hellaswag(tmp_path / "hellaswag_val.jsonl")  # 7 examples: 4 on rank 0, 3 on rank 1
    data_dir = write_shards(tmp_path / "data", random_tokens(400))  # 24 windows of 17: 6 global batches of 2 x 2
    script = tmp_path / "run_eval.py"
    script.write_text(SCRIPT)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with reserved_port() as port:
        proc = subprocess.run(
            [*launch, "--main_process_port", str(port), str(script), str(model_dir), str(hellaswag_file)]
            + [str(data_dir), str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0] == ranks[1]  # every rank returns the same totals

    model = tiny_gpt2()
    single = evaluate_hellaswag(model, load_examples(hellaswag_file), batch_size=2, return_predictions=True)
    two = ranks[0]["hellaswag"]
    assert (two["acc"], two["acc_norm"], two["n"]) == (single["acc"], single["acc_norm"], single["n"])
    for a, b in zip(two["predictions"], single["predictions"], strict=True):  # each example once, in order
        assert (a["ind"], a["pred"], a["pred_norm"]) == (b["ind"], b["pred"], b["pred_norm"])
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    # Two ranks of batch 2 read the same windows as one process of batch 4.
    one_process = evaluate_val_loss(model, data_dir, batch_size=4, seq_len=16)
    assert ranks[0]["val_loss"] == pytest.approx(one_process, rel=1e-6)
