import os, sys
import torch, time, statistics
torch.set_num_threads(2)
H, I, KV, V, L = 576, 1536, 192, 49152, 30
torch.manual_seed(0)
layers = [[torch.randn(o, i) for o, i in [(H,H),(KV,H),(KV,H),(H,H),(I,H),(I,H),(H,I)]] for _ in range(L)]
head = torch.randn(V, H)
F = torch.nn.functional
def model(x):
    for ls in layers:
        q,k,v = F.linear(x, ls[0]), F.linear(x, ls[1]), F.linear(x, ls[2])
        x = x + F.linear(q, ls[3])
        x = x + F.linear(F.silu(F.linear(x, ls[4]))*F.linear(x, ls[5]), ls[6])
    return F.linear(x, head)
def t(f, k=9):
    for _ in range(2): f()
    xs=[]
    for _ in range(k):
        a=time.perf_counter(); f(); xs.append(time.perf_counter()-a)
    return statistics.median(xs)*1e3
r = {M: t(lambda: model(torch.randn(M, H))) for M in (1, 16)}
print(os.environ.get("MKL_CBWR", "default"), " ".join(f"M={M} {v:.1f}ms" for M, v in r.items()), f"ratio {r[16]/r[1]:.2f}")
