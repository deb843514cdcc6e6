"""The Hugging Face Hub: access checks before training, and the push of the exports (their model cards
are `gpt2_scratch.training.model_card`'s)."""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import Accelerator

from gpt2_scratch.training import UserError
from gpt2_scratch.training.export import GPT2_EXPORT, SCRATCH_EXPORT, read_record
from gpt2_scratch.training.processes import on_main_process

logger = logging.getLogger("train")

# What push_to_hub can upload (the config's hub_format): the official layout, ours, or both.
HUB_FORMATS = ("gpt2", "scratch", "both")
# Where hub_format=both puts our layout: a branch, as remote code does not load from a subfolder.
SCRATCH_BRANCH = "scratch"


def check_hub_access(repo_id: str, private: bool = False, api=None, purpose: str = "push_to_hub") -> str:
    """Fail fast, before training: the Hub is reachable, a token is set, and it can write `repo_id`
    (created if missing). Returns the user name. `purpose` (the field that needs the Hub) starts messages."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if constants.is_offline_mode():
        raise UserError(
            f"{purpose} needs the Hub, but offline mode is on (HF_HUB_OFFLINE); unset it or drop --{purpose}"
        )
    api = api or HfApi()
    try:
        user = api.whoami()["name"]
    except LocalTokenNotFoundError as err:
        raise UserError(f"{purpose}: not logged in; run `hf auth login` or set HF_TOKEN to a write token") from err
    except HfHubHTTPError as err:
        raise UserError(f"{purpose}: the Hub rejected the token ({err}); set HF_TOKEN to a valid write token") from err
    except Exception as err:  # network errors differ by HTTP backend; all mean the same here
        raise UserError(f"{purpose}: cannot reach the Hub ({type(err).__name__}: {err}); check the network") from err
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.auth_check(repo_id, write=True)
    except HfHubHTTPError as err:
        raise UserError(
            f"{purpose}: user {user!r} cannot write to {repo_id!r} ({err}); check the repository name and that the "
            "token has write access"
        ) from err
    return user


def offline_reason() -> str | None:
    """Why the Hub cannot be used now (offline mode, or no connection within 3 s), or None."""
    from huggingface_hub import constants

    from eval.common import hub_reachable

    if constants.is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE)"
    return None if hub_reachable() else f"{constants.ENDPOINT} cannot be reached"


def preflight_hub(repo_id: str | None, private: bool, accelerator: Accelerator) -> None:
    """`check_hub_access` for push_to_hub's `repo_id` (None: no push), before any training."""
    if repo_id is not None:
        user = on_main_process(accelerator, lambda: check_hub_access(repo_id, private))
        logger.info("push_to_hub: logged in as %s", user)


def push_export(out_dir: Path, repo_id: str, hub_format: str, message: str, api=None) -> str:
    """Upload the run's export to `repo_id`, one commit per layout; returns the commit URL(s).

    `hub_format`: "gpt2" uploads `hf-gpt2/` (the official layout, which loads everywhere) to the main
    branch; "scratch" uploads `hf/` (our class, remote code) there; "both" does the first, then puts
    `hf/` on the branch `scratch` (remote code cannot be loaded from a subfolder of a repository).
    """
    from huggingface_hub import HfApi

    if hub_format not in HUB_FORMATS:
        raise UserError(f"hub_format must be one of {HUB_FORMATS}, got {hub_format!r}")
    out_dir = Path(out_dir)
    gpt2, scratch = out_dir / GPT2_EXPORT, out_dir / SCRATCH_EXPORT
    if read_record(scratch, "scratch") is None:
        raise UserError(
            f"push_to_hub: {scratch} is not a complete export; rebuild it with python -m gpt2_scratch.export_gpt2"
        )
    if hub_format != "scratch" and read_record(gpt2, "gpt2") is None:
        raise UserError(
            f"push_to_hub: no complete official-layout export at {gpt2}; rebuild it with "
            f"`python -m gpt2_scratch.export_gpt2 {out_dir.name}`, or push ours alone with --hub_format scratch"
        )
    api = api or HfApi()
    urls = []
    if hub_format in ("gpt2", "both"):
        urls.append(upload(api, repo_id, gpt2, message))
    if hub_format == "scratch":
        urls.append(upload(api, repo_id, scratch, message))
    if hub_format == "both":
        api.create_branch(repo_id, branch=SCRATCH_BRANCH, exist_ok=True)
        urls.append(upload(api, repo_id, scratch, message, revision=SCRATCH_BRANCH))
    return " ".join(urls)


def upload(api, repo_id: str, folder: Path, message: str, revision: str | None = None) -> str:
    branch = {"revision": revision} if revision else {}
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message, **branch)
    return getattr(commit, "commit_url", str(commit))
