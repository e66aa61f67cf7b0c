import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def digits():
    from ray_mtt.core.config import DataConfig
    from ray_mtt.core.data import load_dataset
    return load_dataset(DataConfig(dataset="digits"))
