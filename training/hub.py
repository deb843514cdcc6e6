"""The Hugging Face Hub: access checks before training, the push of the export, its model card."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from accelerate import Accelerator

from training import UserError, remote
from training.config import TrainConfig
from training.processes import on_main_process

logger = logging.getLogger("train")


class HubError(UserError, RuntimeError):
    """The Hub cannot be reached, the user is not logged in, or the token cannot write the repository."""


def check_hub_access(repo_id: str, private: bool = False, api=None, purpose: str = "push_to_hub") -> str:
    """Fail fast, before training: the Hub is reachable, a token is set, and it can write `repo_id`
    (created if missing). Returns the user name. `purpose` (the field that needs the Hub) starts messages."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if constants.is_offline_mode():
        raise HubError(
            f"{purpose} needs the Hub, but offline mode is on (HF_HUB_OFFLINE); unset it or drop --{purpose}"
        )
    api = api or HfApi()
    try:
        user = api.whoami()["name"]
    except LocalTokenNotFoundError as err:
        raise HubError(f"{purpose}: not logged in; run `hf auth login` or set HF_TOKEN to a write token") from err
    except HfHubHTTPError as err:
        raise HubError(f"{purpose}: the Hub rejected the token ({err}); set HF_TOKEN to a valid write token") from err
    except Exception as err:  # network errors differ by HTTP backend; all mean the same here
        raise HubError(f"{purpose}: cannot reach the Hub ({type(err).__name__}: {err}); check the network") from err
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.auth_check(repo_id, write=True)
    except HfHubHTTPError as err:
        raise HubError(
            f"{purpose}: user {user!r} cannot write to {repo_id!r} ({err}); check the repository name and that the "
            "token has write access"
        ) from err
    return user


def preflight_hub(config: TrainConfig, accelerator: Accelerator) -> None:
    """`check_hub_access` for push_to_hub, before any training."""
    if config.push_to_hub:
        user = on_main_process(accelerator, lambda: check_hub_access(config.hub_model_id, config.hub_private))
        logger.info("push_to_hub: logged in as %s", user)


def preflight_remote(config: TrainConfig, accelerator: Accelerator) -> remote.RemoteStore | None:
    """The checkpoint_remote store, checked before any training: for hf://, login and write access to the
    repository (`check_hub_access`); for every store, a probe file written and deleted."""
    if config.checkpoint_remote is None:
        return None
    store = remote.open_store(config.checkpoint_remote)  # a bad URL fails on every rank alike

    def check() -> None:
        if store.hub_repo is not None:
            check_hub_access(store.hub_repo, config.hub_private, purpose="checkpoint_remote")
        remote.check_writable(store)

    on_main_process(accelerator, check)
    logger.info("checkpoint_remote: %s is writable; checkpoints go to %s", store.url, store.checkpoints)
    return store


def push_export(folder: Path, repo_id: str, message: str, api=None) -> str:
    """Upload the export folder (weights, code, tokenizer, model card, plot) as one commit; returns its URL."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)
    return getattr(commit, "commit_url", str(commit))


def write_model_card(
    folder: Path,
    config: TrainConfig,
    model,
    step: int,
    tokens: int,
    last_loss: float | None,
    last_eval: dict[str, float],
    data_source: str,
) -> Path:
    """README.md of the export in `folder`: metadata, results, the training config and the loss plot."""
    c = config
    model_config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    repo = c.hub_model_id or Path(c.out_dir).name
    results = [("optimizer steps", f"{step:,} of {c.max_steps:,}"), ("tokens seen", f"{tokens:,}")]
    if last_loss is not None:
        results.append(("final train loss", f"{last_loss:.4f}"))
    results += [(name, f"{value:.4f}") for name, value in last_eval.items()]
    fields = dataclasses.asdict(c)
    card = "\n".join(
        [
            "---",
            "library_name: transformers",
            "pipeline_tag: text-generation",
            "tags: [gpt2, text-generation, pretraining, from-scratch]",
            "---",
            "",
            f"# {repo}",
            "",
            f"GPT-2 (`{c.model}` preset: {model_config.n_layer} layers, {model_config.n_head} heads, width "
            f"{model_config.n_embd}, {n_params / 1e6:.1f}M parameters) trained from scratch with "
            f"`train_accelerate.py` of gpt2-scratch on `{data_source}`.",
            "",
            "## Results",
            "",
            "| metric | value |",
            "| --- | --- |",
            *(f"| {name} | {value} |" for name, value in results),
            "",
            "![training and validation loss](loss.png)",
            "",
            *(["![HellaSwag acc_norm](hellaswag.png)", ""] if "hellaswag/acc_norm" in last_eval else []),
            "## Usage",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            'inputs = tokenizer("Hello, I\'m a language model,", return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**inputs, do_sample=True, top_k=50, max_new_tokens=40)[0]))",
            "```",
            "",
            "## Training config",
            "",
            "| field | value |",
            "| --- | --- |",
            *(f"| `{name}` | `{value}` |" for name, value in fields.items()),
            "",
        ]
    )
    path = folder / "README.md"
    path.write_text(card)
    return path


def describe_source(manifest: dict) -> str:
    source = manifest.get("source", {})
    return str(source.get("name") or source.get("kind") or source) if isinstance(source, dict) else str(source)
