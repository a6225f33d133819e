#!/usr/bin/env bash
# The low-rank branch table: W4A8 and W3A8, no branches / plain-SVD / whitened (data-aware)
# branches at 0.5, 1, 2 and 5 % extra parameters, against onnxruntime's W8A8 and W4A8 and
# onnxq's W8A8, all in one run per model.
#   bash benchmarks/branch_table.sh rec,cls,det benchmarks/results/branches.json [extra run.py args]
set -euo pipefail
models=${1:-rec,cls,det}
out=${2:-benchmarks/out/branches.json}
shift $(( $# < 2 ? $# : 2 ))
extras=()
names=fp32,ort-w8a8,ort-w4a8,onnxq-w8a8
for bits in 4 3; do
    extras+=(--extra "w${bits}a8=--bits $bits --act-bits 8")
    names+=",w${bits}a8"
    for init in svd whitened; do
        for pct in 0.5 1 2 5; do
            name="w${bits}-${init}-${pct}"
            budget=$(python -c "print($pct / 100)")
            extras+=(--extra "$name=--bits $bits --act-bits 8 --rank-budget $budget --branch-init $init")
            names+=",$name"
        done
    done
done
exec python benchmarks/run.py --models "$models" --variants "$names" "${extras[@]}" --json "$out" "$@"
