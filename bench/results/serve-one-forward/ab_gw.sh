#!/bin/bash
for cfg in before after before after; do
  dir=/tmp/before; env="MKL_CBWR="
  [ $cfg = after ] && { dir=/work/main; env=""; }
  echo "== $cfg $(date +%H:%M) $(cut -d' ' -f1-3 /proc/loadavg)"
  (cd $dir && env $env PYTHONPATH=$dir python -m bench.serve --model builtin:smollm2 --servers batched --levels 1,16 --repeats 2 --threads 2 --out /tmp/q/gw-$cfg-$(date +%H%M) 2>&1 | grep -E "^batched|^median|throughput")
done
echo "== end $(date +%H:%M) $(cut -d' ' -f1-3 /proc/loadavg)"
