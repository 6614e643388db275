import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx_musicgen  # noqa: F401  (loads the optimized BLAS before anything imports mlx)
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import fixtures  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)
# The CPU's decoding step, chosen by timing at load (cpu.numpy_decoder.fastest_lm), is pinned: a test may not
# depend on timing. The numpy step has tests of its own.
os.environ["MLX_MUSICGEN_STEP"] = "compiled"


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


@dataclass
class MelodyCheckpoint:
    folder: Path
    reference: object  # transformers MusicgenMelodyForConditionalGeneration
    tokenizer: object  # transformers T5Tokenizer
    extractor: object  # transformers MusicgenMelodyFeatureExtractor (with a test-only Spectrogram stand-in)

    def inputs(self, texts=None, melodies=None):
        """The reference's inputs: tokenized texts (padded) and the extractor's chroma of 32 kHz melodies."""
        import torch

        inputs = dict(self.tokenizer(texts, padding=True, return_tensors="pt")) if texts is not None else {}
        if melodies is not None:
            features = self.extractor(melodies, sampling_rate=32000, return_tensors="pt")["input_features"]
            inputs["input_features"] = features
            if texts is None:  # the null text, as audiocraft gives a melody alone: one masked-out token
                # (transformers' own default feeds the codebook's BOS id 2048 to T5, past a tiny vocabulary)
                inputs["input_ids"] = torch.zeros((features.shape[0], 1), dtype=torch.long)
                inputs["attention_mask"] = torch.zeros((features.shape[0], 1), dtype=torch.long)
        return inputs


@pytest.fixture(scope="session")
def tiny_melody(tmp_path_factory) -> MelodyCheckpoint:
    """A random mono MusicGen-Melody: text width 48 != decoder width 64, a chroma prefix of 7 frames (not 235)."""
    folder = tmp_path_factory.mktemp("tiny_melody")
    return MelodyCheckpoint(folder, *fixtures.build_melody_checkpoint(folder, fixtures.Shape(), chroma_length=7))


@pytest.fixture(scope="session")
def tiny_melody_stereo(tmp_path_factory) -> MelodyCheckpoint:
    """A random stereo MusicGen-Melody: 8 codebooks interleaved L0, R0, ..., a chroma prefix of 5 frames."""
    folder = tmp_path_factory.mktemp("tiny_melody_stereo")
    shape = fixtures.Shape(num_codebooks=8, audio_channels=2)
    return MelodyCheckpoint(folder, *fixtures.build_melody_checkpoint(folder, shape, chroma_length=5, seed=1))
