import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))

from training_helpers import train_tiny_mom  # noqa: E402


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A 4-step tiny MoM run: (out_dir, held-out text path). Holds checkpoints and the saved `final/` folder."""
    return train_tiny_mom(tmp_path_factory.mktemp("mom_run"))
