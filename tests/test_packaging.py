"""A non-editable `pip install .` into a fresh environment gives the working commands mlx_musicgen.convert and
mlx_musicgen.generate, and the studio's command and page files (run from another folder, so nothing is imported
from this checkout)."""

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def test_pip_install_gives_working_commands(tiny, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT / "mlx_musicgen", source / "mlx_musicgen", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    # The environment sees this machine's packages (mlx, transformers, ...) but gets its own mlx_musicgen.
    env = tmp_path / "env"
    venv.create(env, system_site_packages=True, with_pip=False)
    python, bin_dir = env / "bin" / "python", env / "bin"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    work = tmp_path / "work"
    work.mkdir()
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([python, "-c", "import mlx_musicgen; print(mlx_musicgen.__file__)"],
                           capture_output=True, text=True, cwd=work, env=environment)
    assert where.stdout.strip().startswith(str(env)), where.stdout + where.stderr

    def command(name: str, *args) -> subprocess.CompletedProcess:
        return subprocess.run([bin_dir / name, *map(str, args)], capture_output=True, text=True, cwd=work,
                              env=environment, timeout=300)

    converted = command("mlx_musicgen.convert", "--hf-path", tiny.folder, "--mlx-path", "converted")
    assert converted.returncode == 0, converted.stderr
    made = command("mlx_musicgen.generate", "--model", "converted", "--text", "lofi", "--duration", "0.05",
                   "--seed", "1", "--output", "take.wav", "--quiet")
    assert made.returncode == 0, made.stderr
    assert sf.info(str(work / "take.wav")).frames == 50 * 32  # 50 frames of the tiny codec's 32-sample hop
    assert (work / "take.json").is_file()

    tune = command("mlx_musicgen.finetune", "--help")
    assert tune.returncode == 0 and "--adapter-path" in tune.stdout, tune.stderr
    studio = command("mlx_musicgen.studio", "--help")
    assert studio.returncode == 0 and "--output-dir" in studio.stdout, studio.stderr
    page = subprocess.run([python, "-c", "from mlx_musicgen.studio.server import STATIC; "
                           "print(sorted(p.name for p in STATIC.iterdir()))"],
                          capture_output=True, text=True, cwd=work, env=environment)
    assert page.stdout.strip() == "['app.js', 'index.html', 'style.css']", page.stdout + page.stderr
