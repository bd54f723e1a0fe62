from __future__ import annotations

import warnings

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Each test starts with the process's thread count: training stages set their own, and some outputs (the golden
    files) depend on it."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """A random-weight Stable Diffusion pipeline of the embedded layout, saved to disk."""
    from attnseg.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_pipe_dir):
    from attnseg.diffusion.loading import load_pipeline

    return load_pipeline(tiny_pipe_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def predictor(tiny_pipe):
    from attnseg.predictor import AttnSegPredictor

    return AttnSegPredictor(tiny_pipe)


@pytest.fixture
def voc(tmp_path):
    """A 2-image VOC folder. a: 2x4, class 1 (cat) on the left 2 columns. b: class 2 (dog) on the right
    column, one pixel ignored. Images are flat grey."""
    import numpy as np
    from PIL import Image

    from attnseg.io.images import palette_png

    root = tmp_path / "voc"
    gts = {"a": np.array([[1, 1, 0, 0], [1, 1, 0, 0]]), "b": np.array([[0, 0, 0, 2], [0, 0, 255, 2]])}
    for d in ("SegmentationClass", "JPEGImages", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    for k, gt in gts.items():
        palette_png(gt).save(root / "SegmentationClass" / f"{k}.png")
        Image.fromarray(np.full((2, 4, 3), 100, np.uint8)).save(root / "JPEGImages" / f"{k}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\n")
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    return root
