"""The model and tokenizer of a checkpoint (any format `fit` writes) or of a `titans-train export` directory.

Shared by `generate` and `eval`; every problem is a one-line UserError.
"""

from __future__ import annotations

from pathlib import Path


def load_model(path: str | Path):
    """(Recipe, model in eval mode, tokenizer or None) from a checkpoint or an export directory. The tokenizer of
    a checkpoint comes from its recipe's `data.path` (None when that directory is gone and it is not `byte`)."""
    from titans_train.cli import UserError
    from titans_train.train import build as B

    if not Path(path).exists():
        raise UserError(f"checkpoint {path} not found")
    if (Path(path) / "model.safetensors").is_file():  # an export (checkpoints can be directories too)
        from titans_train.train.export import load_export

        try:
            recipe, model, tok = load_export(path)
        except Exception as e:
            raise UserError(f"{path} is not a readable `titans-train export` directory ({type(e).__name__}: {e})") from None
    else:
        recipe, _, model = B.load_model_from_checkpoint(path)
        try:
            tok = B.tokenizer_for(recipe)
        except Exception:  # the data directory is gone; the byte tokenizer needs no files
            from titans_train.data.tokenizer import ByteTokenizer

            tok = ByteTokenizer() if recipe.data.tokenizer == "byte" else None
    return recipe, model.eval(), tok


def require_tokenizer(tok, path) -> None:
    from titans_train.cli import UserError

    if tok is None:
        raise UserError(f"cannot load the tokenizer of {path} (its data.path is gone?): export the checkpoint with "
                        "`titans-train export` and use that directory")


def check_data_tokenizer(tok, data_path: str, ckpt) -> None:
    """The prepared data at `data_path` must have been tokenized with the checkpoint's tokenizer."""
    from titans_train.cli import UserError
    from titans_train.data.shards import Manifest

    rec = Manifest(data_path).tokenizer
    if rec["fingerprint"] != tok.fingerprint():
        raise UserError(f"--data {data_path} was prepared with tokenizer {rec['kind']} (vocab {rec['vocab_size']}, "
                        f"fingerprint {rec['fingerprint'][:12]}) but {ckpt} uses {tok.kind} (vocab {tok.vocab_size}, "
                        f"fingerprint {tok.fingerprint()[:12]}): prepare the data with the checkpoint's tokenizer")
