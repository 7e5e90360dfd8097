"""Suite-wide settings.

One torch thread: the suite runs daemons and writers as subprocesses beside the test process on a
2-core machine, and multi-threaded torch ops stall when their threads compete for cores (the same
reason relexd itself defaults to ``--threads 1``).
"""

import torch

torch.set_num_threads(1)
