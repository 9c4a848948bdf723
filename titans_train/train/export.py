"""`titans-train export CKPT OUT_DIR`: weights as safetensors plus the recipe and tokenizer, for inference.

CKPT is any checkpoint `fit` writes: a file, a sharded (fsdp, torch.distributed.checkpoint) directory or a
DeepSpeed directory; directories are consolidated on this one process into whole fp32 tensors
(`checkpoint.load_weights`), however many ranks wrote them.
OUT_DIR gets `model.safetensors` (model weights only; shared tensors such as tied embeddings stored once),
`recipe.yaml` (the resolved training recipe; its `model:` section rebuilds the network) and `tokenizer.json`
(the tokenizer's own serialisation: a Hugging Face tokenizers file, or a small JSON naming the byte tokenizer).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint (step-*.ckpt: a file, or a sharded / DeepSpeed directory)")
    p.add_argument("out_dir", help="directory to write model.safetensors, recipe.yaml, tokenizer.json")


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import save_model

    from titans_train.train import build as B
    from titans_train.train.checkpoint import atomic_write

    recipe, resolved, model = B.load_model_from_checkpoint(args.ckpt)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.safetensors.tmp"
    save_model(model, str(tmp), metadata={"format": "pt", "variant": recipe.model.variant})
    tmp.replace(out / "model.safetensors")
    atomic_write(out / "recipe.yaml", lambda f: f.write(B.recipe_yaml(resolved).encode()))
    try:
        tok = B.tokenizer_for(recipe)
        atomic_write(out / "tokenizer.json", lambda f: f.write(tok.serialize().encode()))
    except Exception as e:  # the data directory may be gone on the machine that exports
        print(f"note: tokenizer not exported ({e})")
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {recipe.model.variant} ({n / 1e6:.2f}M parameters) to {out}")
    return 0


def load_export(out_dir: str | Path):
    """(Recipe, model, tokenizer or None) from an export directory."""
    import json

    from safetensors.torch import load_model

    from titans_train.train import build as B
    from titans_train.config import recipe_config

    out = Path(out_dir)
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(OmegaConf.load(out / "recipe.yaml"), resolve=True)
    recipe = recipe_config(resolved)
    model = B.build_model(recipe)
    load_model(model, str(out / "model.safetensors"))
    tok = None
    tj = out / "tokenizer.json"
    if tj.is_file():
        from titans_train.data.tokenizer import ByteTokenizer, HFTokenizer

        data = json.loads(tj.read_text())
        tok = ByteTokenizer() if data.get("kind") == "byte" else HFTokenizer(tj)
    return recipe, model, tok
