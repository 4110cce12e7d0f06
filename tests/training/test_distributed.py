"""2-process torchrun runs on the CPU (gloo), DDP and FSDP, with layer dropout dropping whole layers on one rank."""
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
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in result.model.parameters()]  # FSDP: DTensor
    flat = torch.cat([p.detach().reshape(-1) for p in full])
    digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"world_size": dist.get_world_size(), "digests": digests, "steps": result.steps,
                       "sharded": any(hasattr(p, "full_tensor") for p in result.model.parameters())}, f)
""")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_torchrun_on_cpu(tiny_ckpt, tiny_data, tmp_path, mode):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    report, out = tmp_path / "report.json", tmp_path / "out"
    steps = 6
    argv = ["train", "--model", tiny_ckpt, "--data", tiny_data, "--output-dir", out, "--max-steps", steps,
            "--batch-size", 1, "--seq-len", 16, "--save-steps", 3, "--layer-dropout-max", 0.9,
            "--layer-dropout-depth", "uniform", "--curriculum", "rotational", "--rotation", 2,
            "--report-to", "none", "--eval-fraction", 0.1, *(["--fsdp"] if mode == "fsdp" else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(worker), str(report), *map(str, argv)]
    # its own process group, so a hang is cleaned up completely (torchrun's workers included)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("torchrun run hung (killed after 240 s)")
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["world_size"] == 2 and result["steps"] == steps
    assert result["sharded"] == (mode == "fsdp")  # FSDP2 really sharded the parameters (DTensors)
    assert result["digests"][0] == result["digests"][1]  # gradients were all-reduced: replicas agree
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, steps + 1))  # written once, by rank 0
    assert all(r["tokens"] == 2 * 16 for r in log)  # both ranks' tokens
    # the masks are a function of (step, rank): a layer was dropped for all of one rank's rows while the
    # other rank ran it, and DDP (find_unused_parameters=False) neither failed nor hung
    dropout = LayerDropout(4, 0.9, depth="uniform")
    split = [(t, l) for t in range(steps) for l in range(4)
             if dropout.sample_keep(t, 1, 0, 0)[l, 0] != dropout.sample_keep(t, 1, 0, 1)[l, 0]]
    assert split
    for where in ("checkpoint-3", "checkpoint-6"):
        assert (out / where / "rng_state_0.pth").exists() and (out / where / "rng_state_1.pth").exists()
    trained = load_file(str(out / "model.safetensors"))
    init = load_file(str(tiny_ckpt / "model.safetensors"))
    assert set(trained) == set(init)  # a transformers checkpoint, whichever way it was sharded in training
    assert any(not torch.equal(trained[k], init[k]) for k in init)
