"""benchmarks/bench_generate.py and bench_finetune.py end to end on the tiny shape, and benchmarks/step_bytes.py
against sizes computed by hand. Not timing tests: the benchmarks' numbers are only checked for being present,
finite and positive."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from step_bytes import step_bytes  # noqa: E402

SIDE_KEYS = ("tokens_per_s", "ms_per_step", "first_frame_s", "encodec_s", "t5_s", "peak_rss_mb", "floor_ms",
             "floor_share")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_cache")  # the tiny checkpoint, built by the first run, shared


def run(tool, *args):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / tool), *map(str, args)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def bench(cache, tmp_path, *args):
    out, section = tmp_path / "bench.json", tmp_path / "bench.md"
    stdout = run("bench_generate.py", "--shape", "tiny", "--tokens", 8, "--cache-dir", cache, "--bandwidth-mb", 32,
                 "--json", out, "--markdown", section, *args)
    return json.loads(out.read_text()), stdout + "\n" + section.read_text()


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def float32_report(cache, tmp_path_factory):
    return bench(cache, tmp_path_factory.mktemp("float32"), "--runs", 2, "--shared", 1)


@pytest.fixture(scope="module")
def q8_report(cache, tmp_path_factory):
    return bench(cache, tmp_path_factory.mktemp("q8"), "--skip-reference", "-q", 8, "--portable", "--runs", 1)


def test_bench_reports_both_sides_and_ratios(float32_report):
    report, stdout = float32_report
    assert "tokens/s" in stdout and "ours/ref" in stdout and "floor_share:" in stdout
    config = report["config"]
    assert config["tokens"] == 8 and config["frames"] == 8 + 1 - 4 and config["variant"] == "float32"
    assert positive(report["bandwidth_gbps"])
    for side in ("reference", "ours"):
        for key in SIDE_KEYS:
            assert positive(report[side][key]), (side, key, report[side][key])
        assert report[side]["first_frame_s"] < report[side]["total_s"]
        assert report[side]["step_bytes"]["per_step"] > 0
    for key in SIDE_KEYS:
        assert positive(report["ratios"][key]), key
    for side in ("reference", "ours"):  # two fresh processes a side, quiet and with a spinning competitor
        numbers = report[side]
        assert len(numbers["process_runs"]) == len(numbers["shared_runs"]) == 2
        assert numbers["tokens_per_s_min"] <= numbers["tokens_per_s"] <= numbers["tokens_per_s_max"]
        assert positive(numbers["shared_tokens_per_s"]) and positive(numbers["kept"])
    assert "slowest run" in stdout and "speed kept" in stdout
    # the same float32 weights, read from the Hub layout (reference) and the converted folder (ours)
    assert report["reference"]["step_bytes"] == report["ours"]["step_bytes"]
    assert "drift" not in report["ours"]
    # --markdown: the machine, the bandwidth, the date, the table of medians and ratios, and the pairs' range
    assert f"copy bandwidth {report['bandwidth_gbps']:.1f} GB/s" in stdout and report["date"] in stdout
    assert "| | reference | ours | ours / reference |" in stdout
    assert f"| {report['ratios']['tokens_per_s']:.2f}x" not in stdout  # bold, as the headline
    assert f"**{report['ratios']['tokens_per_s']:.2f}x**" in stdout
    assert "pair by pair, ours / reference ran from" in stdout


def test_bench_quantized_portable_reports_drift(q8_report):
    report, stdout = q8_report
    assert report["reference"] is None and report["ratios"] == {}
    assert report["config"]["variant"] == "float32-q8g64" and report["config"]["portable"]
    assert "(portable)" in report["ours"]["framework"]
    for key in SIDE_KEYS:
        assert positive(report["ours"][key]), key
    drift = report["ours"]["drift"]
    assert 0 < drift["max_rel_err"] < 0.05 and 0.5 < drift["top1_agreement_guided"] <= 1
    assert "logits drift" in stdout


def by_hand(folder, rows, quantized=False):
    """Per-step bytes from config.json's sizes: float32 weights, or 8-bit groups of 64 with float32 scales/biases."""
    c = json.loads((Path(folder) / "config.json").read_text())["decoder"]
    H, F, L, K, V = (c[k] for k in ("hidden_size", "ffn_dim", "num_hidden_layers", "num_codebooks", "vocab_size"))
    matrix = (lambda n: n * (1 + 2 * 4 / 64)) if quantized else (lambda n: 4 * n)  # bytes of n weights
    return {
        "layers": L * (matrix(4 * H * H + 2 * H * H + 2 * H * F) + 4 * 3 * 2 * H),  # self q,k,v,o; cross q,o; fc; norms
        "cross_kv_once": L * matrix(2 * H * H),
        "norm": 4 * 2 * H,
        "heads": matrix(K * V * H),
        "embeddings": matrix(K * rows * H),
        "other": 0,
    }


def test_step_bytes_matches_the_config(float32_report, q8_report):
    folders = {**float32_report[0]["config"]["folders"], **q8_report[0]["config"]["folders"]}
    for rows in (2, 4):
        for name, quantized in (("hf", False), ("float32", False), ("float32-q8g64", True)):
            got = step_bytes(folders[name], rows)
            want = by_hand(folders["float32"], rows, quantized)
            assert got == {**want, "per_step": want["layers"] + want["norm"] + want["heads"] + want["embeddings"]}
    stdout = run("step_bytes.py", folders["float32"], "--rows", 2, "--bandwidth", 10)
    assert "per_step" in stdout and "ms/step" in stdout


def test_bench_magnet_reports_the_three_sides(cache, tmp_path):
    """--magnet: audiocraft's MAGNeT, ours and our MusicGen for the same second, with their passes and ratios."""
    out, section = tmp_path / "magnet.json", tmp_path / "magnet.md"
    stdout = run("bench_generate.py", "--magnet", "--shape", "tiny", "--duration", 1, "--decoding-steps", "1,1,1,1",
                 "--runs", 1, "--cache-dir", cache, "--bandwidth-mb", 32, "--json", out, "--markdown", section)
    report = json.loads(out.read_text())
    sides = report["sides"]
    assert set(sides) == {"reference", "ours", "musicgen"} and report["config"]["frames"] == 999  # whole spans
    assert sides["reference"]["passes"] == sides["ours"]["passes"] == 4 and sides["musicgen"]["passes"] > 100
    for side in sides.values():
        assert all(positive(side[key]) for key in ("seconds", "s_per_pass", "frames_per_s"))
    assert positive(report["ratios"]["ours_vs_audiocraft"]) and positive(report["ratios"]["sooner"])
    assert "MAGNeT here" in stdout and "MAGNeT's clip arrives" in section.read_text()


def test_finetune_bench_takes_turns_and_gives_each_pairs_ratio(cache, tmp_path):
    out = tmp_path / "finetune.json"
    stdout = run("bench_finetune.py", "--shape", "tiny", "--seconds", 0.5, "--steps", 1, "--runs", 2, "--modes",
                 "lora", "--cache-dir", cache, "--json", out)
    report = json.loads(out.read_text())
    assert "copy bandwidth" in stdout and "lora: ours / reference" in stdout
    assert positive(report["bandwidth_gbps"]) and report["config"]["runs"] == 2
    for side in ("reference-lora", "ours-lora"):
        result = report["results"][side]
        assert len(result["process_runs"]) == 2
        assert result["step_s"] == pytest.approx(statistics.median(run["step_s"] for run in result["process_runs"]))
        assert all(positive(run["tokens_per_s"]) and all(map(math.isfinite, run["losses"]))
                   for run in result["process_runs"])
    ratio = report["ratios"]["lora"]
    assert len(ratio["pairs"]) == 2 and all(map(positive, ratio["pairs"])) and positive(ratio["tokens_per_s"])
