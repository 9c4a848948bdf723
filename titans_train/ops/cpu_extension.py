"""Building this package's C++ CPU kernels on first use (`torch.utils.cpp_extension.load`), once per process.

A kernel is one source file next to its Python wrapper. The build needs a C++ compiler and ninja (about 30 s per
kernel, cached under ~/.cache/torch_extensions or TORCH_EXTENSIONS_DIR). When it fails, the wrapper falls back to
its PyTorch path (same results) and `Extension.error` says why; TITANS_CPU_KERNEL=0 skips every attempt.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path


class Extension:
    """One lazily built kernel: `module()` builds it on first call (thread-safe) and returns it, or None."""

    def __init__(self, prefix: str, source: Path, what: str):
        self.prefix, self.source, self.what = prefix, source, what
        self.error: str | None = None
        self._module = None
        self._lock = threading.Lock()

    def module(self):
        if self._module is not None or self.error is not None:
            return self._module
        with self._lock:
            if self._module is None and self.error is None:
                self._build()
        return self._module

    def _build(self) -> None:
        if os.environ.get("TITANS_CPU_KERNEL", "1") in ("0", "false", "False"):
            self.error = "disabled by TITANS_CPU_KERNEL=0"
            return
        try:
            from torch.utils.cpp_extension import _get_build_directory, load

            # -march=native: the build is per machine; the name carries the CPU so that a shared cache directory
            # (e.g. a home directory on a cluster of mixed nodes) never hands one machine another's binary, and the
            # source's hash so that two checkouts of different versions never rebuild (or wait on) each other's.
            tag = "".join(ch for ch in (platform.processor() or platform.machine()) if ch.isalnum())[:24]
            code = self.source.read_bytes() + (Path(__file__).with_name("cpu_capability.h")).read_bytes()
            digest = hashlib.sha256(code).hexdigest()[:10]  # the source and the header it includes
            name = f"{self.prefix}_{tag}_{digest}"
            if not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists():
                print(f"titans-train: compiling {self.what} (first use on this machine, ~30 s; cached after)",
                      file=sys.stderr, flush=True)
            self._module = load(
                name=name,
                sources=[str(self.source)],
                # -fopenmp: at::parallel_for is a header template; without it its loops run on one thread.
                extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as e:  # no compiler, no ninja, unsupported platform: the Python paths still work
            self.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            warnings.warn(f"titans-train: {self.what} did not build ({self.error}); using the slower PyTorch path "
                          "(same results). Set TITANS_CPU_KERNEL=0 to skip the attempt.", stacklevel=3)
