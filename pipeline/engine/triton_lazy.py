"""Triton kernels built on first use, so that importing a module that defines them never imports Triton.

A module writes its kernels inside a builder that takes the two Triton modules and returns the jitted
kernels, and decorates it:

    @triton_kernels
    def _kernels(triton: Any, tl: Any) -> Any:
        @triton.jit
        def my_kernel(x_ptr, BLOCK: tl.constexpr): ...
        return my_kernel

`_kernels()` then imports Triton once, runs the builder and caches its result, or returns None when
Triton is not installed (CPU-only installs run the torch fallbacks; the kernels run only on the GPU).
The kernels see `triton` / `tl` as the builder's parameters, just as they would see local imports.
`_kernels.cache_clear()` drops the cached kernels so that the next call builds them again (the tests do
this after setting TRITON_INTERPRET=1, to run the kernels interpreted on CPU tensors).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)


class LazyKernels(Protocol):
    def __call__(self) -> Any: ...

    def cache_clear(self) -> None: ...


def triton_kernels(build: Callable[[Any, Any], Any]) -> LazyKernels:
    """`build(triton, triton.language)` at the first call, cached; None without Triton."""

    @functools.cache
    def kernels() -> Any:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            log.debug("triton not installed: %s.%s builds no kernels", build.__module__, build.__name__)
            return None
        return build(triton, tl)

    kernels.__doc__ = build.__doc__
    return kernels


def available_on(device: torch.device, kernels: LazyKernels) -> bool:
    """A Triton backend's `is_available`: a CUDA device torch can use, and the kernels built (checked
    last, so that a CPU device never imports Triton)."""
    return device.type == "cuda" and torch.cuda.is_available() and kernels() is not None


def runs_on(x: torch.Tensor, kernels: LazyKernels) -> bool:
    """Whether the kernels run for tensor `x`: on CUDA, outside torch.compile (which traces the torch
    fallback instead, for Inductor to fuse), with Triton installed (checked last, as above)."""
    return x.is_cuda and not torch.compiler.is_compiling() and kernels() is not None
