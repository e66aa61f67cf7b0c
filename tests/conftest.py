import os
import secrets
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

# Ray reads RAY_AUTH_MODE when it is imported, so it is set here, before any test module imports it:
# the test process is a token-authenticated client of every cluster it starts or joins (Ray 2.60's
# own default for local clusters), with one token file of mode 0600. The cluster bed gives the same
# token to its nodes (tests/cluster_bed.py).
if "RAY_AUTH_TOKEN_PATH" not in os.environ:
    _token = Path(tempfile.mkdtemp(prefix="ray_mtt_token_")) / "auth_token"
    _token.write_text(secrets.token_hex(32))
    _token.chmod(0o600)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(_token))


@pytest.fixture
def digits():
    from ray_mtt.core.config import DataConfig
    from ray_mtt.core.data import load_dataset
    return load_dataset(DataConfig(dataset="digits"))
