"""benchmarks/bench_generate.py end to end on the tiny shape: it runs, and its JSON holds sane numbers.
Not a timing test: the numbers are only checked for being present, finite and positive."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_generate.py"


def run_bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--shape", "tiny", "--tokens", "8", "--cache-dir", str(tmp_path / "cache"),
         "--bandwidth-mb", "32", "--json", str(out), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text()), result.stdout


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_reports_both_sides(tmp_path):
    report, stdout = run_bench(tmp_path)
    assert "tokens/s" in stdout and "warm-up" in stdout and "bandwidth floor" in stdout
    config = report["config"]
    assert config["tokens"] == 8 and config["batch"] == 1 and config["variant"] == "float32"
    assert config["frames"] == 8 + 1 - 4
    for side in ("reference", "ours"):
        s = report[side]["summary"]
        for key in ("tokens_per_s", "real_time_factor", "time_to_first_audio_s", "time_to_first_frame_s",
                    "t5_s", "steps_s", "encodec_s", "ms_per_step_mean"):
            assert positive(s[key]), (side, key, s[key])
        assert s["time_to_first_audio_s"] == s["total_s"]  # neither side streams
        assert s["t5_s"] + s["encodec_s"] < s["total_s"]
        assert s["time_to_first_frame_s"] < s["total_s"]
        assert math.isclose(s["audio_s"], 5 * 32 / 32000)  # 5 frames of the tiny codec's 32-sample hop
        memory = report[side]["memory"]
        assert positive(memory["peak_rss_mb"]) and memory["peak_rss_mb"] >= memory["rss_after_load_mb"]
    assert report["reference"]["runs"][0]["decoder_calls"] in (8, 9)  # one forward per step (+ a prefill)
    assert 1 <= report["ours"]["runs"][0]["progress_calls"] <= 5  # frames come out as they complete
    assert report["ours"]["device"] and report["reference"]["device"]
    floor = report["floor"]
    for key in ("weight_gb_per_step", "bandwidth_gbps", "floor_ms_per_step", "ours_ms_per_step", "fraction_of_floor"):
        assert positive(floor[key]), (key, floor[key])
    weights = report["ours"]["weight_bytes"]
    assert weights["per_step"] == weights["layers"] + weights["heads"] + weights["embeddings"] + weights["norm"]
    assert weights["cross_kv_once"] > 0
    assert "drift" not in report["ours"]  # float32 is the baseline
    assert set(report["targets"]) and not any(t["applicable"] for t in report["targets"].values())


def test_bench_quantized_reports_drift(tmp_path):
    report, stdout = run_bench(tmp_path, "--skip-reference", "-q", "8")
    assert report["reference"] is None and report["config"]["variant"] == "float32-q8g64"
    assert positive(report["ours"]["summary"]["tokens_per_s"])
    drift = report["ours"]["drift"]
    assert 0 < drift["first_step_max_rel_err"] < 0.05  # 8-bit groups of 64: well under a percent in practice
    assert 0 < drift["teacher_forced_32_max_rel_err"] < 0.05
    assert 0.5 < drift["top1_agreement_guided"] <= 1
    assert "drift" in stdout
    # the float32 conversion (the drift baseline) and the quantized one are both cached
    cache = Path(report["config"]["cache"])
    assert (cache / "mlx-float32" / "model.safetensors").is_file()
    assert (cache / "mlx-float32-q8g64" / "model.safetensors").is_file()
