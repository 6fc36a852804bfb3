"""Two gloo processes on the CPU: SyncBN against single-process BN, MABN's per-rank statistics under DDP."""
import copy
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mabn

WORLD = 2


def _run(worker, tmp_path, *args):
    mp.spawn(worker, args=(f"file://{tmp_path}/store", str(tmp_path)) + args, nprocs=WORLD, join=True)


def _init(rank, store):
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD)
    torch.manual_seed(0)  # the same global batch on every rank; each takes its slice


def _sync_bn_worker(rank, store, out_dir, sizes):
    _init(rank, store)
    try:
        global_x = torch.randn(sum(sizes), 3, 4, 4, dtype=torch.float64)
        global_dy = torch.randn_like(global_x)
        start = sum(sizes[:rank])
        local = slice(start, start + sizes[rank])

        reference = nn.BatchNorm2d(3).double()
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5)
            reference.bias.uniform_(-1, 1)
        synced = mabn.SyncBatchNorm(3).double()
        synced.load_state_dict(reference.state_dict())

        x_ref = global_x.clone().requires_grad_()
        reference(x_ref).backward(global_dy)
        x = global_x[local].clone().requires_grad_()
        y = synced(x)
        y.backward(global_dy[local])

        with torch.no_grad():
            reference_train_out = nn.functional.batch_norm(
                global_x, None, None, reference.weight, reference.bias, True, 0.0, reference.eps
            )
        torch.testing.assert_close(y.detach(), reference_train_out[local])
        torch.testing.assert_close(x.grad, x_ref.grad[local])
        # parameter gradients: each rank holds its share; their sum is the single-process gradient
        for p, q in zip(synced.parameters(), reference.parameters()):
            total = p.grad.clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, q.grad)
        torch.testing.assert_close(synced.running_mean, reference.running_mean)
        torch.testing.assert_close(synced.running_var, reference.running_var)
        open(os.path.join(out_dir, f"ok{rank}"), "w").close()
    finally:
        dist.destroy_process_group()


def test_sync_batch_norm_matches_single_process_batch_norm(tmp_path):
    _run(_sync_bn_worker, tmp_path, [3, 5])
    assert all(os.path.exists(tmp_path / f"ok{r}") for r in range(WORLD))


def test_sync_batch_norm_with_an_empty_rank(tmp_path):
    _run(_sync_bn_worker, tmp_path, [0, 4])
    assert all(os.path.exists(tmp_path / f"ok{r}") for r in range(WORLD))


def _mabn_ddp_worker(rank, store, out_dir):
    _init(rank, store)
    try:
        make = lambda: nn.Sequential(mabn.CenConv2d(3, 4, 3), mabn.MABN2d(4, buffer_size=2, warmup_iters=1, renorm_warmup_iters=2))  # noqa: E731
        model = make().double()
        local_model = copy.deepcopy(model)  # the same layer trained on this rank's data alone
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        for _ in range(4):
            x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=g)
            ddp(x).square().mean().backward()
            local_model(x).square().mean().backward()
        for (name, ours), theirs in zip(model[1].state_dict().items(), local_model[1].state_dict().values()):
            if name not in ("weight", "bias"):
                torch.testing.assert_close(ours, theirs, msg=name)
        gathered = [torch.zeros_like(model[1].running_var) for _ in range(WORLD)]
        dist.all_gather(gathered, model[1].running_var)
        assert not torch.allclose(gathered[0], gathered[1]), "ranks must keep their own statistics"
        open(os.path.join(out_dir, f"ok{rank}"), "w").close()
    finally:
        dist.destroy_process_group()


def test_mabn_keeps_per_rank_statistics_under_ddp(tmp_path):
    _run(_mabn_ddp_worker, tmp_path)
    assert all(os.path.exists(tmp_path / f"ok{r}") for r in range(WORLD))
