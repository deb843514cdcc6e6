"""gpt2_scratch/training/hub.py: the access check before training fails fast and says what to do."""

import time

import pytest

from gpt2_scratch.training.hub import check_hub_access
from gpt2_scratch.user_errors import UserError


def test_push_preflight_fails_fast_offline():
    start = time.perf_counter()
    with pytest.raises(UserError, match="offline mode is on"):
        check_hub_access("someone/tiny-gpt2")
    assert time.perf_counter() - start < 5


def test_push_preflight_without_login_says_how_to_log_in(monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalTokenNotFoundError

    class NoToken:
        def whoami(self):
            raise LocalTokenNotFoundError("no token")

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    with pytest.raises(UserError, match="hf auth login"):
        check_hub_access("someone/tiny-gpt2", api=NoToken())
