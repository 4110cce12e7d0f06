"""torchrun runs: 2 processes on the CPU (gloo, DDP) and, where there are GPUs, FSDP.

The CPU run uses heavy layer dropout with one row per rank, so that some layer is dropped for all of one
rank's rows while the other rank runs it: DDP (find_unused_parameters=False) must neither fail nor hang.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from layerskip.training.layer_dropout import LayerDropout

WORKER = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    import torch.distributed as dist
    from layerskip.cli import build_parser
    from layerskip.training.cli import config_from_args
    from layerskip.training.trainer import train

    # the `layerskip train` argument parser and library call, as `torchrun -m layerskip train ...` runs them
    args = build_parser().parse_args(sys.argv[2:])
    result = train(config_from_args(args))
    params = list(result.model.parameters())
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]  # FSDP: DTensors
    flat = torch.cat([p.detach().float().cpu().reshape(-1) for p in full])
    digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"world_size": dist.get_world_size(), "digests": digests, "steps": result.steps,
                       "sharded": any(hasattr(p, "full_tensor") for p in params)}, f)
    dist.destroy_process_group()  # as `layerskip train` does: one left to interpreter exit can abort a worker
""")
STEPS = 6


def test_two_process_torchrun_on_cpu(tiny_ckpt, tiny_data, tmp_path):
    out = _run(tiny_ckpt, tiny_data, tmp_path, nproc=2)
    result = json.loads((tmp_path / "report.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == STEPS and not result["sharded"]
    assert result["digests"][0] == result["digests"][1]  # gradients were all-reduced: the replicas agree
    # the masks are a function of (step, rank): some layer ran on one rank and on none of the other's rows
    dropout = LayerDropout(4, 0.9, depth="uniform")
    assert any(dropout.sample_keep(t, 1, 0, 0)[l, 0] != dropout.sample_keep(t, 1, 0, 1)[l, 0]
               for t in range(STEPS) for l in range(4))
    for where in ("checkpoint-3", "checkpoint-6"):
        assert (out / where / "rng_state_0.pth").exists() and (out / where / "rng_state_1.pth").exists()
    _check_outputs(out, tiny_ckpt, nproc=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP runs on GPU processes only (accelerate)")
def test_fsdp_on_gpus(tiny_ckpt, tiny_data, tmp_path):
    nproc = torch.cuda.device_count()
    out = _run(tiny_ckpt, tiny_data, tmp_path, nproc=nproc, extra=["--fsdp"])
    result = json.loads((tmp_path / "report.json").read_text())
    assert result["world_size"] == nproc and result["steps"] == STEPS
    assert result["sharded"]  # FSDP2 really sharded the parameters (DTensors)
    _check_outputs(out, tiny_ckpt, nproc=nproc)


def _run(tiny_ckpt, tiny_data, tmp_path, nproc, extra=()):
    worker, out = tmp_path / "worker.py", tmp_path / "out"
    worker.write_text(WORKER)
    argv = ["train", "--model", tiny_ckpt, "--data", tiny_data, "--output-dir", out, "--max-steps", STEPS,
            "--batch-size", 1, "--seq-len", 16, "--save-steps", 3, "--layer-dropout-max", 0.9,
            "--layer-dropout-depth", "uniform", "--curriculum", "rotational", "--rotation", 2,
            "--report-to", "none", "--eval-fraction", 0.1, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(worker), str(tmp_path / "report.json"), *map(str, argv)]
    # its own process group, so that a hang is cleaned up completely (torchrun's workers included)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("torchrun run hung (killed after 240 s)")
    assert proc.returncode == 0, stderr[-3000:]
    return out


def _check_outputs(out, tiny_ckpt, nproc):
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))  # written once, by rank 0
    assert all(r["tokens"] == nproc * 16 for r in log)  # every rank's tokens
    trained = load_file(str(out / "model.safetensors"))
    init = load_file(str(tiny_ckpt / "model.safetensors"))
    assert set(trained) == set(init)  # a transformers checkpoint, however it was sharded in training
    assert any(not torch.equal(trained[k], init[k]) for k in init)
