"""DistributedDataParallel and FSDP train every backend's feature model as it is.

Two processes on the CPU (gloo), DDP's default ``find_unused_parameters=False``:
a final norm kept for ``forward_intermediates`` must not trip DDP's check for
parameters without gradients (docs/training.md#distributed-training). FSDP2's
``fully_shard`` shards the same models. After a few steps the parameters are
equal across ranks and have moved.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

_WORKER = r"""
import json, os, sys
import torch, torch.distributed as dist
import unifeat

rank, world, port, name, kwargs, out, wrap = (
    int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5]),
    sys.argv[6], sys.argv[7],
)
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=rank, world_size=world)
torch.manual_seed(0)  # the same weights on both ranks
if name == "torchvision.models.VisionTransformer":  # a module instance, as users pass one
    import torchvision

    model = unifeat.create_model(
        torchvision.models.VisionTransformer(**kwargs), features_only=True
    ).train()
elif name == "module":  # a module of your own: the fx backend
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, 2, 1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
    )
    model = unifeat.create_model(net, features_only=True, input_size=(32, 32)).train()
else:
    model = unifeat.create_model(name, features_only=True, **kwargs).train()
start = {n: p.detach().clone() for n, p in model.named_parameters()}
if wrap == "fsdp":
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)  # in place: the model's parameters become shards
    wrapped = model
else:
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.05)
torch.manual_seed(1 + rank)  # each rank its own data
size = model.input_size[1:]
for _ in range(3):
    maps = wrapped(torch.randn(2, 3, *size))
    loss = torch.stack([m.float().pow(2).mean() for m in maps]).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
full = {
    n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
    for n, p in model.named_parameters()
}
flat = torch.cat([t.flatten() for t in full.values()])
gathered = [torch.empty_like(flat) for _ in range(world)]
dist.all_gather(gathered, flat)
moved = any(not torch.equal(start[n], t) for n, t in full.items())
if rank == 0:
    with open(out, "w") as fh:
        json.dump({"equal": all(torch.equal(g, gathered[0]) for g in gathered), "moved": moved}, fh)
dist.barrier()
dist.destroy_process_group()
# Skip interpreter teardown: gloo's threads can abort it ("terminate called
# without an active exception") after the work is done and written.
os._exit(0)
"""

CASES = [
    # A plain ViT keeps its final norm for forward_intermediates: the case DDP rejected.
    pytest.param("timm:vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, id="timm-vit"),
    pytest.param(
        "torchvision.models.VisionTransformer",
        {
            "image_size": 32,
            "patch_size": 8,
            "num_layers": 2,
            "num_heads": 2,
            "hidden_dim": 32,
            "mlp_dim": 64,
        },
        id="tv-vit",
    ),
    pytest.param(
        "hf:vit",
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        id="hf-vit",
    ),
    pytest.param(
        "oc:ViT-B-32",
        {"layers": 2, "width": 32, "head_width": 16, "image_size": 32, "patch_size": 8},
        id="open_clip-vit",
    ),
    pytest.param("tv:resnet18", {}, id="tv-resnet"),
    pytest.param("module", {}, id="module"),
]
_BY_ID = {case.id: case for case in CASES}
# FSDP2 (fully_shard) on the same models: the hook runner (transformers), the graph
# runners (torchvision, a module of your own) and the native ones (timm, open_clip).
FSDP_CASES = [
    pytest.param(*_BY_ID[name].values, id=name)
    for name in ("timm-vit", "tv-resnet", "hf-vit", "open_clip-vit", "module")
]


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_ddp_trains_with_default_settings(name: str, kwargs: dict, tmp_path: Path) -> None:
    _train_on_two_ranks(name, kwargs, tmp_path, "ddp")


@pytest.mark.parametrize(("name", "kwargs"), FSDP_CASES)
def test_fsdp_shards_and_trains(name: str, kwargs: dict, tmp_path: Path) -> None:
    _train_on_two_ranks(name, kwargs, tmp_path, "fsdp")


def _train_on_two_ranks(name: str, kwargs: dict, tmp_path: Path, wrap: str) -> None:
    out, port = tmp_path / "result.json", _free_port()
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER,
                str(rank),
                "2",
                port,
                name,
                json.dumps(kwargs),
                str(out),
                wrap,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    errors = []
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        if worker.returncode != 0:
            errors.append(err[-3000:])
    assert not errors, errors[0]
    result = json.loads(out.read_text())
    assert result == {"equal": True, "moved": True}
