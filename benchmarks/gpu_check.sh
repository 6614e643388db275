#!/usr/bin/env bash
# The GPU checks of docs/performance.md, on a machine where MLX runs on a GPU (mlx[cuda] beside torch on CUDA, or
# a Mac): the parity tests on MLX's GPU, the primitives (kernels) of a decoding step counted there, and
# bench_generate.py against torch on the same GPU, the compiled step and the step op by op, for each shape.
#
#     benchmarks/gpu_check.sh OUT_DIR [SHAPE ...]        # shapes: small medium (the default), tiny for a smoke run
#
# Run it from anywhere; everything it prints goes to OUT_DIR too (tests.txt, SHAPE-*.json/.md, a step_ops JSON per
# checkpoint; stderr in *.err). Each part runs even where one before it failed; the exit status is the first
# failure's.
set -u
shopt -s nullglob
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [SHAPE ...]}
shift
if [ $# -gt 0 ]; then shapes=("$@"); else shapes=(small medium); fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."  # the repository's root: the tests, the benchmarks and their .bench_cache
status=0
run() {  # run NAME COMMAND...: the command's output to the terminal and to OUT_DIR/NAME (stderr to NAME.err)
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2> >(tee "$out/$name.err" >&2) | tee "$out/$name"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
    return 0
}
export PYTHONUNBUFFERED=1
run device.txt python -c "import mlx.core as mx, torch; print('mlx', mx.__version__, mx.default_device(), \
'| torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
run tests.txt python -m pytest -q -p no:cacheprovider tests/test_decoder.py tests/test_t5.py tests/test_encodec.py \
    tests/test_generate.py
for shape in "${shapes[@]}"; do
    run "$shape-compiled.txt" python benchmarks/bench_generate.py --shape "$shape" --tokens 200 --runs 1 --portable \
        --json "$out/$shape-compiled.json" --markdown "$out/$shape-compiled.md"
    run "$shape-op-by-op.txt" python benchmarks/bench_generate.py --shape "$shape" --tokens 200 --runs 1 --portable \
        --skip-reference --env MLX_MUSICGEN_STEP=op-by-op --json "$out/$shape-op-by-op.json"
    for folder in .bench_cache/"$shape"-*/mlx-float32; do  # the checkpoint bench_generate.py just built
        run "$(basename "$(dirname "$folder")")-step_ops.json" python benchmarks/step_ops.py "$folder"
    done
done
exit $status
