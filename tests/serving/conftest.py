import torch

# Tiny models gain nothing from a second thread, and on a 2-core machine shared with other tests
# torch's threads wait on each other (see tests/steps/conftest.py).
torch.set_num_threads(1)
