"""Loggers: a CSV log always, and W&B through Lightning's WandbLogger unless switched off.

W&B runs online only when an API key is configured (WANDB_API_KEY, or a netrc entry for the W&B host, as
`wandb login` writes); otherwise offline, with the run kept under the run's directory (`wandb sync` uploads it
later). The run id is generated here once and saved in every checkpoint, so a resumed run continues the same
W&B run instead of starting a new one.
"""

from __future__ import annotations

import netrc
import os
import secrets
import string
from pathlib import Path
from urllib.parse import urlparse


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(setting: str) -> str:
    """online | offline | off, from the recipe's `logging.wandb` (auto | online | offline | off) and the environment."""
    env = os.environ.get("WANDB_MODE", "").lower()
    if setting == "off" or env == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true"):
        return "off"
    if setting == "auto":
        if env in ("offline", "dryrun"):
            return "offline"
        return "online" if wandb_api_key_configured() else "offline"
    return setting


def new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def build_loggers(recipe, resolved: dict, run_id: str | None, *, out_dir: str | Path) -> tuple[list, str | None]:
    """(loggers, W&B run id or None). `recipe` is the typed Recipe; `resolved` its plain dict (logged as config)."""
    from lightning.pytorch.loggers import CSVLogger

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A new version folder per (re)start: Lightning's CSV writer would otherwise replace an existing metrics.csv.
    # Flushed at every log step, so that a killed run keeps its metrics up to its last log.
    loggers: list = [CSVLogger(save_dir=str(out_dir), name="csv", flush_logs_every_n_steps=recipe.trainer.log_every_steps)]
    mode = wandb_mode(recipe.logging.wandb)
    if mode == "off":
        return loggers, None
    try:
        import wandb  # noqa: F401
    except ImportError:
        import warnings

        warnings.warn("wandb is not installed: logging to CSV only (pip install wandb)", stacklevel=2)
        return loggers, run_id
    from lightning.pytorch.loggers import WandbLogger

    run_id = run_id or new_run_id()
    lg = recipe.logging
    wandb_logger = WandbLogger(
        project=lg.project,
        entity=lg.entity,
        name=lg.run_name,
        tags=list(lg.tags) or None,
        id=run_id,
        resume="allow",
        save_dir=str(out_dir),
        offline=(mode == "offline"),
        config=resolved,
        log_model=False,
    )
    loggers.append(wandb_logger)
    return loggers, run_id
