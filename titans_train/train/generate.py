"""`titans-train generate CKPT --prompt TEXT`: sample a continuation from a checkpoint or an export directory."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint (step-*.ckpt: a file, or a sharded / DeepSpeed directory) or a "
                                "directory written by `titans-train export`")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from titans_train.cli import UserError
    from titans_train.eval.load import load_model, require_tokenizer

    recipe, model, tok = load_model(args.ckpt)
    require_tokenizer(tok, args.ckpt)
    torch.manual_seed(args.seed)
    model.eval()
    ids = torch.as_tensor(tok.encode(args.prompt), dtype=torch.long)[None]  # (1, T)
    if ids.shape[1] == 0:
        raise UserError("--prompt is empty")
    with torch.no_grad():
        out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None)
    new = out[0, ids.shape[1]:] if out.shape[1] > ids.shape[1] else out[0]
    print(args.prompt + tok.decode(new.tolist()))
    return 0
