"""`titans-train` command line: one subcommand per job; the work lives in the modules named below.

Each module listed in SUBCOMMANDS exposes `add_arguments(parser)` and `run(args) -> int`. Such a module keeps
its heavy imports (Lightning, W&B, datasets) inside `run`, so `titans-train --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, one-line help). Add a row when a subcommand lands.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("data.prepare", "raw text -> tokenized webdataset shards + manifest.json"),
    "info": ("models.info", "what a recipe builds: variant, sizes, parameters, FLOPs per token (meta device)"),
    "fit": ("train.fit", "train a model from a recipe (default: the tiny model on the built-in corpus), resuming"),
    "validate": ("train.validate", "validation loss and perplexity of a checkpoint"),
    "export": ("train.export", "checkpoint -> safetensors + recipe + tokenizer for inference"),
    "generate": ("train.generate", "continue a prompt with a checkpoint or an exported model"),
    "eval": ("eval.cli", "long-context evaluation: loss by position, needle in a haystack, lm-eval tasks"),
    "launch": ("train.slurm", "render (--dry-run: print) and submit a multi-node SLURM job for a recipe"),
}


# subcommands that run models on the CPU (flush_denormals before they start)
COMPUTE_COMMANDS = frozenset({"fit", "validate", "generate", "eval"})


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit code 2, no traceback."""


CPU_RUNTIME_DEFAULTS = (("OMP_WAIT_POLICY", "PASSIVE"), ("THP_MEM_ALLOC_ENABLE", "1"))
# glibc malloc: (environment variable, mallopt parameter number from malloc.h, value), for training / otherwise.
MALLOC_TRAINING = ("MALLOC_MMAP_MAX_", -4, 0)
MALLOC_STREAMING = ("MALLOC_MMAP_THRESHOLD_", -3, 128 * 1024)


def cpu_runtime_defaults(environ=os.environ, training: bool = False) -> dict[str, str]:
    """Set the CPU runtime's environment defaults, unless the user set them; returns what it set.

    Must run before torch is imported: its OpenMP runtime and allocator read these once.
    - OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning. With the default active wait the
      main process's threads spin between ops and starve the DataLoader workers (and anything else sharing the
      cores): steps ran 5-20x slower under contention (BENCHMARKS.md, "CPU threads").
    - THP_MEM_ALLOC_ENABLE=1: torch's CPU allocator asks for transparent huge pages for large tensors (fewer page
      faults per fresh megabyte).
    - glibc malloc, unless MALLOC_MMAP_MAX_ or MALLOC_MMAP_THRESHOLD_ is set. By default glibc maps blocks above a
      threshold fresh and unmaps them when freed, and raises that threshold (to 32 MB at most) to the size of each
      mapped block freed, so that mid-sized blocks then come from its heap.
      Training (MALLOC_MMAP_MAX_=0): every block from the heap, so the blocks one step frees are reused by the
      next. Mapped fresh, every large activation of every step is faulted in and zeroed again: at T = 32K a MAG
      training step took 23.5 s instead of 14.4 s (elementwise ops 2-5x slower per element than at 2K). The
      trade is the one PyTorch's CUDA caching allocator makes: freed blocks stay with the process (that step's
      peak RSS grew from 9.3 to 13.8 GB). A 2K step does not change.
      Otherwise (eval, generate; MALLOC_MMAP_THRESHOLD_=131072, glibc's initial value, kept fixed): a stream's
      pieces are mapped fresh and returned when freed, so its RSS stays flat over millions of tokens. From the heap
      (either of the other two) the holes between live blocks grew a 2M-token MAG stream's max RSS by 17%.
    glibc reads these variables when a process starts: they are exported for child processes (workers, torchrun,
    benchmark subprocesses) and, when `environ` is this process's, also applied now with mallopt.
    """
    changes = {key: value for key, value in CPU_RUNTIME_DEFAULTS if key not in environ}
    if "MALLOC_MMAP_MAX_" not in environ and "MALLOC_MMAP_THRESHOLD_" not in environ:
        key, param, value = MALLOC_TRAINING if training else MALLOC_STREAMING
        changes[key] = str(value)
        if environ is os.environ:
            _mallopt(param, value)
    environ.update(changes)
    return changes


def flush_denormals() -> bool:
    """Flush subnormal floats to zero on this CPU (FTZ/DAZ), for every thread that computes; False where the CPU
    has no such mode. Why: the forgetting gate decays parts of a carried memory state geometrically, through the
    subnormal range (below 1.2e-38 in float32), where x86 arithmetic takes a microcode assist per operation. A
    MAG training window with the state carried from the previous ones ran 5.5 s, then 18.1 s and 28.8 s once
    2 M of its state's values were subnormal; flushed, 4.6-5.5 s over 16 windows (BENCHMARKS.md, "CPU threads").
    Values that small carry nothing a float32 sum could keep. Imports torch: call it where computing starts."""
    import torch

    return torch.set_flush_denormal(True)


def _mallopt(param: int, value: int) -> bool:
    """glibc's mallopt for this process; False where there is none (macOS, Windows, musl's no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL(None).mallopt(param, value))
    except (OSError, AttributeError):
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="titans-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(_module=module)
        _load(module).add_arguments(p)
    return parser


def _load(module: str):
    return importlib.import_module(f"titans_train.{module}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cpu_runtime_defaults(training=bool(argv) and argv[0] == "fit")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes positionals in one run: `key=value` overrides after an option land here; keep them.
    if extra and isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in COMPUTE_COMMANDS:
        flush_denormals()
    try:
        return int(_load(args._module).run(args) or 0)
    except UserError as e:
        print(f"titans-train {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m titans_train.cli` runs this file as __main__, a second copy of the module whose UserError is
    # another class than the one the commands raise: call the imported module's main instead.
    from titans_train.cli import main as _main

    sys.exit(_main())
