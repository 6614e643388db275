"""/api/info: the model and the limits, what the page's form offers."""

from __future__ import annotations

from fastapi import APIRouter

from ..limits import MAX_DURATION, MAX_GUIDANCE
from ..settings import command_settings
from ..version import __version__
from .deps import Jobs, MaxUploadBytes

router = APIRouter()


@router.get("/api/info")
def info(jobs: Jobs, max_upload_bytes: MaxUploadBytes) -> dict:
    """The model and the limits: what the page's form offers, with the settings' defaults (GenerationConfig's)."""
    defaults = {name: setting.default for name, setting in
                command_settings(jobs.model_info.get("kind", "musicgen")).items()}
    if defaults["duration"] is None:  # one window: a MAGNeT model's clip
        defaults["duration"] = jobs.model_info.get("window_seconds")
    return {**jobs.model_info, "model": jobs.model_name, "version": __version__, "max_upload_bytes": max_upload_bytes,
            "max_queued": jobs.max_queued, "output": str(jobs.output), "defaults": defaults,
            "max_duration": MAX_DURATION, "max_guidance": MAX_GUIDANCE}
