"""Kernel tests run the Triton kernels in Triton's CPU interpreter where no GPU is present.

Triton reads TRITON_INTERPRET when ``triton.jit`` decorates a function, not at launch. The top-level conftest has
already imported triton (through kvpress) and this package by now, so the kernels of this package are decorated on
their first launch instead (``dispatch.lazy_jit``) and call Triton builtins only, not the helpers that triton.language
decorates at its own import (tl.sum, tl.cumsum). Setting the variable here, before any launch, is then enough.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def needs_triton():
    pytest.importorskip("triton")
