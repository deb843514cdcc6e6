"""The one root for errors in what the user gave. Every part of the project may import it (it imports
nothing of the project), so the trainer, `data_prep`, `eval` and the conversion commands share it."""


class UserError(Exception):
    """An error in what the user gave (a config value, a file, a URL, an account): a command prints it
    as one `error:` line and exits with status 2, never as a traceback."""
