import pytest
import torch

from tests.cluster_bed import use_token_auth

torch.set_num_threads(min(2, torch.get_num_threads()))

# Ray reads RAY_AUTH_MODE when it is imported, so it is set here, before any test module imports it:
# the test process is a token-authenticated client of every cluster it starts or joins (Ray 2.60's
# own default for local clusters), with one token file of mode 0600, which the cluster bed's nodes
# get too (tests/cluster_bed.py).
use_token_auth()


@pytest.fixture
def digits():
    from ray_mtt.core.config import DataConfig
    from ray_mtt.core.data import load_dataset
    return load_dataset(DataConfig(dataset="digits"))
