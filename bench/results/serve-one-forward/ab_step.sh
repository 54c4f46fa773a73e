#!/bin/bash
# serve_step A/B: before (5e70a16), after without MKL's AVX2 path, after; interleaved, 3 rounds
for i in 1 2 3; do
  for cfg in before after-noavx2 after; do
    case $cfg in
      before) dir=/tmp/before; env="MKL_CBWR=";;
      after-noavx2) dir=/work/main; env="MKL_CBWR=";;
      after) dir=/work/main; env="";;
    esac
    echo "== $cfg round $i $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd $dir && env $env python -m bench.serve_step --model smollm2 --threads 2 --batch-sizes 1,16 --no-progress --out /tmp/q/step-$cfg-$i 2>&1 | grep "plain  batch" | sed 's/\[serve_step\] plain  //')
  done
done
