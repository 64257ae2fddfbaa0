"""Does the reference training shape run faster as two single-threaded DDP processes than as one
process with two threads? (docs/BENCHMARKS.md, session 10: no.)

    python3 bench/ddp_split.py single                                   # 1 process, all threads, batch 12
    torchrun --standalone --nproc_per_node 2 bench/ddp_split.py ddp     # 2 x 1 thread, batch 6 each

Same model, optimizer and random tokens as `gptlab bench train` (gpt2 4x128, block 64, global batch 12);
prints ms per step (min and median of 8 windows of 8 steps) and achieved GFLOP/s.
"""
import os, sys, time, torch, torch.distributed as dist
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.train.loop import TrainConfig, make_optimizer
from gptlab.device import tune_cpu_allocator
mode = sys.argv[1]  # "ddp" or "single"
if mode == "ddp":
    dist.init_process_group("gloo"); rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
else:
    rank, world = 0, 1
tune_cpu_allocator()
cfg = GPTConfig.preset("tiny", "gpt2", vocab_size=4096, n_layer=4, n_head=4, n_embd=128, block_size=64)
torch.manual_seed(0)
model = GPT(cfg).train()
opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
run = model
if mode == "ddp":
    from torch.nn.parallel import DistributedDataParallel as DDP
    run = DDP(model, bucket_cap_mb=int(os.environ.get("BUCKET", 25)), gradient_as_bucket_view=True)
B = 12 // world
x = torch.randint(0, cfg.vocab_size, (B, cfg.block_size)); y = torch.randint(0, cfg.vocab_size, (B, cfg.block_size))
def step():
    _, loss = run(x, y); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(5): step()
ts = []
for r in range(8):
    if mode == "ddp": dist.barrier()
    t0 = time.perf_counter()
    for _ in range(8): step()
    ts.append((time.perf_counter() - t0) / 8)
if rank == 0:
    flops = model.flops_per_token() * B * world * cfg.block_size     # the whole global batch per step
    print(mode, "ms/step min %.1f median %.1f" % (1000 * min(ts), 1000 * sorted(ts)[4]),
          "GFLOP/s %.1f" % (flops / min(ts) / 1e9))
if mode == "ddp": dist.destroy_process_group()
