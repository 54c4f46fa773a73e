import time, statistics, torch, sys
sys.argv=["x","--model","smollm2","--threads","2"]
import bench.serve_step as ss
from bench import harness
args = ss.arguments(sys.argv[1:]); built = harness.build(args)
import streaming_trt as st
from streaming_trt.engine import BatchRunner
m = built.model
r = BatchRunner(m, st.Geometry(4, 252), slots=16)
for row in range(16):
    r.reset(row); r.prefill(row, list(range(100, 160)))
def t(f, k=7):
    xs=[]
    for _ in range(k):
        a=time.perf_counter(); f(); xs.append(time.perf_counter()-a)
    return round(1e3*statistics.median(xs))
rows=list(range(16))
for rep in range(2):
    print("decode16", t(lambda: r.decode(rows, [5]*16)))
    print("feed 15x1+1x2", t(lambda: r.feed(rows, [[5]]*15+[[5,6]])))
    print("feed 15x1+1x60", t(lambda: r.feed(rows, [[5]]*15+[list(range(60))]), 3))
    print("decode1", t(lambda: r.decode([0], [5])))
    print("prefill1x2", t(lambda: r.prefill(0, [5, 6])))
    print("save", t(lambda: r.save(0)))
