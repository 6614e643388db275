"""Limits on what a request or a checkpoint may ask for, in one place that every layer can read."""

MAX_DURATION = 3600.0  # seconds: longer requests are refused as mistakes (an hour of music is a day on a laptop)
WINDOW_SECONDS = 30.0  # the window of every MusicGen checkpoint (audiocraft's max_duration)
MAX_GUIDANCE = 100.0  # guidance scales above this only amplify logits towards overflow (3 is typical)
FAMILIES = ("musicgen", "audiogen")  # text to music, text to sound: one model, each with its own defaults
SPAN_ARRANGEMENTS = ("nonoverlap", "stride1")  # MAGNeT's masking: non-overlapping spans, or overlapping ones
