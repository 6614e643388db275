import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx_musicgen  # noqa: F401  (loads the optimized BLAS before anything imports mlx)
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import fixtures  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)


@dataclass
class Checkpoint:
    folder: Path
    reference: object  # transformers MusicgenForConditionalGeneration
    processor: object  # transformers MusicgenProcessor


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    import torch

    torch.set_num_threads(2)
    torch.set_grad_enabled(False)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Checkpoint:
    """A random mono MusicGen in the Hub layout: text width 48 != decoder width 64, 2 decoder heads, 4 codebooks."""
    folder = tmp_path_factory.mktemp("tiny")
    model, processor = fixtures.build_checkpoint(folder, fixtures.Shape())
    return Checkpoint(folder, model, processor)


@pytest.fixture(scope="session")
def tiny_stereo(tmp_path_factory) -> Checkpoint:
    """A random stereo MusicGen: 8 codebooks interleaved L0, R0, L1, R1, ..., decoded by a mono EnCodec."""
    folder = tmp_path_factory.mktemp("tiny_stereo")
    model, processor = fixtures.build_checkpoint(folder, fixtures.Shape(num_codebooks=8, audio_channels=2), seed=1)
    return Checkpoint(folder, model, processor)
