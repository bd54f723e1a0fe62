from __future__ import annotations

import warnings

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """A random-weight Stable Diffusion pipeline of the embedded layout, saved to disk."""
    from attnseg.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_pipe_dir):
    from attnseg.models import load_pipeline

    return load_pipeline(tiny_pipe_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def predictor(tiny_pipe):
    from attnseg.predictor import AttnSegPredictor

    return AttnSegPredictor(tiny_pipe)
