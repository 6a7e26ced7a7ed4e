"""Session set-up shared by every test module."""
import os

import torch

# Triton fixes its language (interpreter or compiler) when it is first imported, so the
# interpreter is chosen here, before any test module can import it: without a GPU the
# Triton kernels are tested on CPU tensors through TRITON_INTERPRET=1.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
