"""The process set-up `import mlx_musicgen` does on Linux (mlx_musicgen/_linux.py): MKL's thread team sized to
the cores this process can use, idle threads that sleep, and the user's own settings left alone."""

import json
import os
import subprocess
import sys

import pytest

from mlx_musicgen import _linux

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process set-up")
THREAD_SETTINGS = ("MKL_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")


def settings_after_import(env: dict, cpus: set[int] | None = None) -> dict:
    """The thread settings of a fresh process's environment after `import mlx_musicgen`, and its MKL team
    ("team"), run on `cpus` if given."""
    code = (f"import json, os, mlx_musicgen; from mlx_musicgen import _linux; "
            f"print(json.dumps({{'team': _linux.blas_team(), **{{k: os.environ.get(k) for k in {THREAD_SETTINGS}}}}}))")
    base = {k: v for k, v in os.environ.items() if k not in THREAD_SETTINGS}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env},
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_usable_cores_follow_the_affinity():
    cores = len(os.sched_getaffinity(0))
    assert 1 <= _linux.usable_cores() <= cores


@pytest.mark.skipif(_linux.LOADED != _linux.MKL, reason="MKL is not what this machine loaded")
def test_mkl_team_is_the_usable_cores_less_one_and_sleeps_when_idle():
    cores = len(os.sched_getaffinity(0))
    settings = settings_after_import({})
    assert settings["team"] == max(1, _linux.usable_cores() - 1)
    assert settings["OMP_WAIT_POLICY"] == "PASSIVE"
    # set through MKL, not the environment: a child process of this one sizes its own team
    assert settings["MKL_NUM_THREADS"] is None and settings["OMP_NUM_THREADS"] is None
    one = {min(os.sched_getaffinity(0))}
    assert settings_after_import({}, one)["team"] == 1
    if cores >= 2:
        two = set(sorted(os.sched_getaffinity(0))[:2])
        assert settings_after_import({}, two)["team"] == 1
        assert settings_after_import({"OMP_WAIT_POLICY": "PASSIVE"}, two)["team"] == 1  # what a child inherits


@pytest.mark.skipif(_linux.LOADED != _linux.MKL, reason="MKL is not what this machine loaded")
def test_the_users_thread_settings_win():
    cores = _linux.usable_cores()  # MKL caps its team at the cores; ours would be one fewer
    assert settings_after_import({"MKL_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": "ACTIVE"}) == {
        "team": cores, "MKL_NUM_THREADS": str(cores), "OMP_NUM_THREADS": None, "OMP_WAIT_POLICY": "ACTIVE"}
    settings = settings_after_import({"OMP_NUM_THREADS": str(cores)})
    assert settings["MKL_NUM_THREADS"] is None and settings["team"] == cores


def test_the_mkl_team_for_decoding_is_chosen_by_measurement(monkeypatch):
    """The default team (cores less one) is kept unless the other is faster by more than 5%, chosen once per
    decoder shape and set for the products that follow; nothing is timed when the user chose the team."""
    from mlx_musicgen.cpu import threads

    step_seconds = {1: 0.100, 2: 0.090}  # what a step takes with each team here
    team, calls = [None], []
    monkeypatch.setattr(_linux, "usable_cores", lambda: 2)
    monkeypatch.setattr(_linux, "blas_team_is_ours", lambda: True)
    monkeypatch.setattr(_linux, "set_blas_threads", lambda n: team.__setitem__(0, n) or True)
    monkeypatch.setattr(threads.time, "perf_counter", lambda: 0.0)  # every step as fast: the default stays
    monkeypatch.setattr(threads, "_chosen", {})

    def time_steps(n):
        calls.append(n)
        return [step_seconds[n]] * 3

    assert threads.fastest_team(time_steps, [1, 2]) == 2  # 10% faster
    step_seconds[2] = 0.097
    assert threads.fastest_team(time_steps, [1, 2]) == 1  # 3%: noise, the default stays
    step_seconds[2] = 0.150
    assert threads.fastest_team(time_steps, [1, 2]) == 1

    steps = []
    assert threads.choose_blas_team(lambda: steps.append(team[0]), ("shape",), steps=2) == 1
    assert steps == [1, 1, 1, 2, 2, 2] and team[0] == 1  # a warm-up and two timed steps each, then the choice
    assert threads.choose_blas_team(lambda: steps.append(team[0]), ("shape",)) == 1 and len(steps) == 6  # once
    monkeypatch.setattr(_linux, "blas_team_is_ours", lambda: False)
    assert threads.choose_blas_team(lambda: steps.append(team[0]), ("other",)) is None and len(steps) == 6


def test_the_numpy_steps_team_follows_the_step_times():
    """Each team is timed once, in order; then the fastest lately runs, and every 4th step tries another: a team
    slowed by a busy core is left after one slow step, and taken again once its probes are fast."""
    from mlx_musicgen.cpu.threads import TeamByTiming

    team = TeamByTiming([2, 1], probe_every=4, weight=0.5)
    seconds = {2: 0.10, 1: 0.15}  # what a step takes with each team, now
    chosen = []

    def steps(count):
        for _ in range(count):
            chosen.append(team.next_team())
            team.record(chosen[-1], seconds[chosen[-1]])

    steps(8)
    assert chosen == [2, 1, 2, 2, 1, 2, 2, 2]  # both timed, then 2; the probe at step 4 tries 1
    seconds[2] = 0.40  # a core taken by another program: two threads wait on each other
    steps(4)
    assert chosen[-4:] == [1, 2, 1, 1]  # the probe, 2's slow step (its average 0.25 s), and 2 is left
    seconds[2] = 0.10  # the core is free again
    steps(8)
    assert chosen[-8:] == [2, 1, 1, 1, 2, 2, 2, 2]  # two fast probes bring 2's average under 1's
    assert TeamByTiming([1]).next_team() == 1


def test_large_products_run_on_every_core(monkeypatch):
    """cpu.threads.every_core_for_blas: MKL's team on every usable core inside, the decoding team restored
    after (also after an error), and nothing changed where the user chose the team."""
    from mlx_musicgen.cpu import threads

    team = [1]
    monkeypatch.setattr(_linux, "usable_cores", lambda: 4)
    monkeypatch.setattr(_linux, "blas_team_is_ours", lambda: True)
    monkeypatch.setattr(_linux, "blas_team", lambda: team[0])
    monkeypatch.setattr(_linux, "set_blas_threads", lambda n: team.__setitem__(0, n) or True)
    with threads.every_core_for_blas():
        assert team[0] == 4
    assert team[0] == 1
    with pytest.raises(KeyboardInterrupt), threads.every_core_for_blas():
        raise KeyboardInterrupt
    assert team[0] == 1
    monkeypatch.setattr(_linux, "blas_team_is_ours", lambda: False)
    with threads.every_core_for_blas():
        assert team[0] == 1


def openblas_installed() -> bool:
    return any(subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({name!r})"],
                              capture_output=True).returncode == 0 for name in _linux.OPENBLAS_NAMES)


def test_openblas_trains_faster_only_where_mkl_runs_its_generic_code(monkeypatch):
    monkeypatch.delenv("MLX_MUSICGEN_BLAS", raising=False)
    monkeypatch.setattr(_linux, "LOADED", _linux.MKL)
    monkeypatch.setattr(_linux, "cpu_vendor", lambda: "GenuineIntel")
    assert not _linux.openblas_trains_faster()  # MKL's own CPUs: MKL stays
    monkeypatch.setattr(_linux, "cpu_vendor", lambda: None)
    assert not _linux.openblas_trains_faster()  # unknown: nothing changes
    monkeypatch.setattr(_linux, "cpu_vendor", lambda: "AuthenticAMD")
    assert _linux.openblas_trains_faster() == openblas_installed()
    monkeypatch.setenv("MLX_MUSICGEN_BLAS", "mkl")
    assert not _linux.openblas_trains_faster()  # the user's choice wins
    monkeypatch.delenv("MLX_MUSICGEN_BLAS")
    monkeypatch.setattr(_linux, "LOADED", _linux.OPENBLAS)
    assert not _linux.openblas_trains_faster()  # already
    assert _linux.cpu_vendor() is None or _linux.cpu_vendor().isprintable()


def test_a_fine_tune_restarts_with_openblas_threads_that_sleep_at_once_unless_the_user_chose(monkeypatch):
    monkeypatch.setattr(_linux, "openblas_trains_faster", lambda: False)
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    assert _linux.training_environment() == ({"OPENBLAS_THREAD_TIMEOUT": "4"} if _linux.openblas_loaded() else {})
    monkeypatch.setattr(_linux, "openblas_loaded", lambda: False)
    assert _linux.training_environment() == {}  # no OpenBLAS (numpy on MKL, say): no restart
    monkeypatch.setattr(_linux, "openblas_trains_faster", lambda: True)
    assert _linux.training_environment() == {"OPENBLAS_THREAD_TIMEOUT": "4", "MLX_MUSICGEN_BLAS": "openblas"}
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "28")
    assert _linux.training_environment() == {"MLX_MUSICGEN_BLAS": "openblas"}  # the user's choice stays


@pytest.mark.skipif(not openblas_installed() or _linux.LOADED != _linux.MKL,
                    reason="restarting with OpenBLAS: MKL loaded first, and OpenBLAS (libopenblas0-pthread) installed")
def test_restarting_with_openblas_runs_the_command_again_with_every_core_for_training(tmp_path):
    """restart_with runs the same command line (`-m` included) again in its process, with OpenBLAS as
    MLX's BLAS, on one thread (numpy's own OpenBLAS left alone), and without the variables set for MKL; there
    use_all_cores_for_blas gives MLX's OpenBLAS every core."""
    (tmp_path / "command.py").write_text(
        "import json, os, sys, mlx_musicgen\n"
        "from mlx_musicgen import _linux\n"
        "from threadpoolctl import ThreadpoolController\n"
        "if os.environ.get('MLX_MUSICGEN_BLAS') != 'openblas':\n"
        "    print('first run', flush=True)\n"
        "    _linux.restart_with({'MLX_MUSICGEN_BLAS': 'openblas'})\n"
        "teams = lambda: {c.prefix: c.num_threads for c in ThreadpoolController().select(internal_api='openblas')"
        ".lib_controllers}\n"
        "before = teams()\n"
        "_linux.use_all_cores_for_blas()\n"
        "print(json.dumps({'argv': sys.argv[1:], 'blas': _linux.LOADED, 'before': before, 'after': teams(),\n"
        "                  **{k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'MKL_THREADING_LAYER',\n"
        "                                                    'OPENBLAS_NUM_THREADS', 'KEPT')}}))\n")
    env = {k: v for k, v in os.environ.items()
           if k not in (*THREAD_SETTINGS, "OPENBLAS_NUM_THREADS", "MKL_THREADING_LAYER", "MLX_MUSICGEN_BLAS")}
    result = subprocess.run([sys.executable, "-m", "command", "--an", "argument"], capture_output=True, text=True,
                            cwd=tmp_path, env={**env, "KEPT": "yes"}, timeout=120)
    assert result.returncode == 0, result.stderr
    first, last = result.stdout.splitlines()
    report = json.loads(last)
    assert first == "first run" and report["argv"] == ["--an", "argument"] and report["blas"] == _linux.OPENBLAS
    assert report["KEPT"] == "yes"
    assert report["OMP_WAIT_POLICY"] is report["MKL_THREADING_LAYER"] is report["OPENBLAS_NUM_THREADS"] is None
    assert report["before"]["libopenblas"] == 1 and report["after"]["libopenblas"] == _linux.usable_cores()
    assert report["before"].get("libscipy_openblas", 0) != 1 or _linux.usable_cores() == 1  # numpy's: its own


def test_an_unknown_blas_request_is_ignored_with_a_warning():
    code = "import mlx_musicgen; from mlx_musicgen import _linux; print(_linux.LOADED)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MLX_MUSICGEN_BLAS": "mlk"})
    assert result.returncode == 0, result.stderr
    assert "MLX_MUSICGEN_BLAS='mlk' is not mkl or openblas: ignored" in result.stderr
    assert result.stdout.strip() == str(_linux.LOADED)  # as with no request
