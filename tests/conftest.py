import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# The tests use tiny tensors: thread start-up costs dominate, and on a loaded 2-core machine two
# threads per op made tiny ops ~1000x slower than one.
torch.set_num_threads(1)
