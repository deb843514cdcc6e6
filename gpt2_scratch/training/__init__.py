"""The training library behind `train_accelerate.py`: config, the GPT-3 recipe, metrics, checkpoints
(local and remote), the run directory and the Hugging Face Hub. The launch script builds the pieces and
runs the loop; everything here takes the pieces it needs, so tests and benchmarks import it directly.
"""

from gpt2_scratch.user_errors import UserError

__all__ = ["UserError"]
