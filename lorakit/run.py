"""The run options of one command: device, output dtype, seed, window size, threads, resolved once.

The command line (``cli/_options.run_options``) or a Python caller builds one :class:`RunOptions` with
:meth:`RunOptions.resolve` at its entry, and every layer below receives it resolved: no verb, engine or operator
parses ``"auto"`` or ``"cuda"`` again, and every entry has the same default (``auto``: CUDA when present).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.device import resolve_device
from lorakit.linalg import default_window_bytes


@dataclass(frozen=True)
class RunOptions:
    """Resolved options of one run.

    Attributes:
        device: where the arithmetic runs (a concrete ``torch.device``; ``cuda`` only when one is present).
        dtype: output dtype of written factors; ``None`` keeps each module's input dtype.
        seed: seed of a verb's own randomness (extract's probes, lq-decompose's randomized SVDs); ``None``: the
            verb's documented default (0). A merge method's ``--seed`` is an operator parameter, not this.
        window_bytes: float32 bytes of factors a streaming loop batches at once (``default_window_bytes``:
            1, one module at a time, on CPU; 512 MiB on CUDA); 0 turns batching off.
        threads: torch intra-op threads for the run, set by :meth:`resolve` (the process's torch setting, as
            ``OMP_NUM_THREADS`` would set it); ``None`` leaves torch's setting alone.
    """

    device: torch.device
    dtype: torch.dtype | None = None
    seed: int | None = None
    window_bytes: int = 1
    threads: int | None = None

    @classmethod
    def resolve(cls, device: str | torch.device | None = "auto", *, dtype: torch.dtype | None = None,
                seed: int | None = None, window_bytes: int | None = None,
                threads: int | None = None) -> RunOptions:
        """The one place a device name is resolved (``auto`` → CUDA if available, else CPU); ``threads``, when
        given, is applied here (``torch.set_num_threads``), once.

        Raises:
            LorakitError: ``cuda`` asked for without a CUDA device; ``threads`` or ``window_bytes`` negative.
        """
        from lorakit.errors import LorakitError

        dev = resolve_device(device)
        if threads is not None and threads < 1:
            raise LorakitError(f"threads must be at least 1, got {threads}")
        if window_bytes is not None and window_bytes < 0:
            raise LorakitError(f"window bytes must be ≥ 0, got {window_bytes}")
        if threads is not None:
            torch.set_num_threads(threads)
        return cls(dev, dtype, seed, default_window_bytes(dev) if window_bytes is None else window_bytes, threads)

    def seed_or(self, default: int = 0) -> int:
        """The seed, or the verb's default when none was given."""
        return default if self.seed is None else self.seed


def run_options(run: RunOptions | None) -> RunOptions:
    """``run``, or the defaults (``RunOptions.resolve()``) for a Python caller that passed none."""
    return run if run is not None else RunOptions.resolve()


__all__ = ["RunOptions", "run_options"]
