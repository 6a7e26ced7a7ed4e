"""Session set-up shared by every test module."""
import os
import tempfile

import torch

# Triton fixes its language (interpreter or compiler) when it is first imported, so the
# interpreter is chosen here, before any test module can import it: without a GPU the
# Triton kernels are tested on CPU tensors through TRITON_INTERPRET=1.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's caches (Inductor's and the FX graph cache) live in one folder per machine
# by default; a test run keeps its own, so code compiled by another checkout of tropfast
# (other op schemas) is never loaded here.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tropfast-tests-inductor-"))

# Progress bars lock with a threading lock and start no monitor thread.  tqdm's default lock
# is a multiprocessing semaphore, shared by every process forked after it was made: when the
# mutation runs (benchmarks/mutation.py) stop a forked test process that holds it, every later
# one waits on it forever.
import threading  # noqa: E402

import tqdm  # noqa: E402

tqdm.tqdm.set_lock(threading.RLock())
tqdm.tqdm.monitor_interval = 0
