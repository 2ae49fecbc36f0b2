# Root conftest: runs before any test module imports a kernel. Without a GPU,
# Triton kernels run through the interpreter on CPU tensors.
import os

try:
    import torch
    _cuda = torch.cuda.is_available()
except ImportError:
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
