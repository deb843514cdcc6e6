"""The training library behind `train_accelerate.py`: config, the GPT-3 recipe, metrics, checkpoints
(local and remote), the run directory and the Hugging Face Hub. The launch script builds the pieces and
runs the loop; everything here takes the pieces it needs, so tests and benchmarks import it directly.
"""


class UserError(Exception):
    """An error in what the user gave (a config value, a file, a URL, an account): the command line
    prints it as one `error:` line and exits with status 2, never as a traceback."""
