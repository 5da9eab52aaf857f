import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# The test models are tiny: intra-op threads buy nothing, and on a 2-core machine where the services under test (or
# anything else) keep a core busy, two spinning torch threads make every op ~100x slower.
torch.set_num_threads(1)
