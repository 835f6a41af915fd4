"""torch.compile vs eager for one dit-mini training step (batch 32), measured in one process.

    .venv/bin/python bench/compile_speedup.py
"""
import time, statistics, torch
from simple_dit import get_preset, build_model
from simple_dit.diffusion import make_process
c = get_preset("dit-mini"); proc = make_process(c.diffusion)
torch.manual_seed(0)
x = torch.randn(32, 1, 28, 28); y = torch.randint(0, 10, (32,))
def bench(model, n=10):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    def step():
        loss = proc.training_loss(model, x, y); opt.zero_grad(); loss.backward(); opt.step()
    for _ in range(3): step()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    return 32 / statistics.median(ts)
eager = build_model(c.model)
t0 = time.perf_counter()
compiled = torch.compile(build_model(c.model))
r_eager = bench(eager)
try:
    r_comp = bench(compiled); print("compile ok, incl. warmup", round(time.perf_counter() - t0), "s")
except Exception as e:
    r_comp = None; print("compile failed:", type(e).__name__, str(e)[:200])
r_eager2 = bench(eager)
print(f"eager {r_eager:.1f} / {r_eager2:.1f} img/s, compiled {r_comp} img/s")
