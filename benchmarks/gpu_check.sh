#!/usr/bin/env bash
# The prepared GPU check (sized for under 5 minutes on one H200): the test suite on a CUDA machine, then the
# throughput table at paper size. Every dependency is in the lent machine's image, so it runs from the working
# tree without installing. Output goes to $OUT (the device tool's folder) or ./gpu-check.
#
#   bash benchmarks/gpu_check.sh            # then copy the table into benchmarks/RESULTS.md with date and hardware
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-gpu-check}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())" | tee -a "$out/gpu.txt"
# the suite, minus the slow CPU-process tests (about a minute)
timeout 120 python3 -m pytest -q -x -m "not slow" -p no:cacheprovider tests 2>&1 | tail -5 | tee "$out/tests.txt"
# one training run on the GPU through the CLI (bf16 autocast by default there)
timeout 60 python3 -m mulan train --preset digits-mulan --out "$out/run" --no-progress --quick train.steps=300 \
    train.eval_every=0 2>&1 | tail -4 | tee "$out/train.txt"
# throughput at paper size: eager fp32, bf16, compiled (each configuration in its own process)
timeout 170 python3 benchmarks/throughput.py --device cuda --cifar-batch 128 --steps 10 --timeout 60 \
    --modes eager,bf16,compiled,channels_last --json "$out/throughput.json" 2>&1 | tee "$out/throughput.txt"
