"""Takes on disk, as the CLI and the studio both write them: the audio (normalised, written atomically) and its
sidecar NAME.json, the settings that remake it, also kept in the audio's comment tag. The two are one output:
neither replaces an existing file unasked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import atomic
from .audio import check_output, normalize, write_audio
from .settings import GenerationConfig
from .version import __version__

RECORDED = ("duration", "seed", "do_sample", "guidance_scale", "top_k", "top_p", "temperature", "extend_stride")
MAGNET_RECORDED = ("decoding_steps", "span_arrangement", "max_cfg", "min_cfg")  # where the model is MAGNeT


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def check_clip_output(path: str | Path, *, overwrite: bool, bits: str = "16") -> Path:
    """audio.check_output, and the sidecar: an existing NAME.json (another take's record, e.g. NAME.wav's
    beside a new NAME.flac) counts as an existing file."""
    path = check_output(path, overwrite=overwrite, bits=bits)
    sidecar = sidecar_path(path)
    if sidecar.exists() and not overwrite:
        raise FileExistsError(f"{sidecar} exists (the record of another take): pass --overwrite to replace it, or "
                              f"choose another --output.")
    return path


def clip_settings(*, model: str, adapter: str | None, config: GenerationConfig, batch: list, audio_prompt, melody,
                  normalize: str, sampling_rate: int) -> dict:
    """What a clip's sidecar records beside its text and batch index: everything that remakes it."""
    names = RECORDED + (MAGNET_RECORDED if config.decoding_steps is not None else ())
    settings = {name: getattr(config, name) for name in names}
    return {"model": model, "adapter": adapter, "duration": settings.pop("duration"), "seed": settings.pop("seed"),
            "batch": batch, "audio_prompt": audio_prompt, "melody": melody, **settings, "normalize": normalize,
            "sampling_rate": sampling_rate, "mlx_musicgen": __version__}


def write_clip(path: Path, audio: np.ndarray, record: dict, sampling_rate: int, *, bits: str,
               normalization: str) -> Path:
    """A clip (channels, samples), normalised, written atomically with `record` (its settings) in its comment
    tag and beside it as NAME.json, also atomically; returns the sidecar's path."""
    write_audio(path, normalize(audio, sampling_rate, normalization), sampling_rate, bits=bits,
                comment=json.dumps(record, ensure_ascii=False))
    sidecar = sidecar_path(path)
    atomic.write_text(sidecar, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return sidecar
