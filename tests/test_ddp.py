"""Data parallelism (issue 9, part 3): `torchrun --nproc_per_node 2 distill.py` on CPU (gloo) must train exactly
what one process trains with the same global batch: the same loss trajectory, the same final weights and the
same results.json, up to float rounding. Tiny random models with dropout 0, so that both runs are deterministic."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import distill
import model

REPO = Path(__file__).resolve().parents[1]


def test_two_gloo_processes_match_one_process(tiny_checkpoint, data_dir, tmp_path):
    teacher = tiny_checkpoint("teacher", hidden=32, seed=0, mlm_head=False)
    student = tiny_checkpoint("student", hidden=48, seed=1, mlm_head=False)
    # 29 rows, batch 8: the last global batch has 5 rows, split 3 + 2: unequal slices are covered too.
    args = ["--teacher", str(teacher), "--student", str(student), "--data_dir", str(data_dir),
            "--langs", "eng_Latn,deu_Latn", "--limit", "29", "--eval_limit", "16", "--epochs", "2",
            "--batch_size", "8", "--dropout", "0", "--lr", "5e-4", "--log_every", "1", "--device", "cpu"]
    one = distill.main(args + ["--out_dir", str(tmp_path / "one")])

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "distill.py", *args, "--out_dir", str(tmp_path / "two")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["details"]["world_size"] == 2 and one["details"]["world_size"] == 1
    assert two["results"] == one["results"] and two["mean"] == one["mean"]

    log1, log2 = (json.loads((tmp_path / run / "results.json").read_text())["details"]["train_log"]["1"]
                  for run in ("one", "two"))
    for method in distill.METHODS:
        steps1, losses1 = zip(*log1[method]["loss"])
        steps2, losses2 = zip(*log2[method]["loss"])
        assert steps1 == steps2 and len(steps1) == 2 * 4          # 4 global batches per epoch, 2 epochs
        assert torch.allclose(torch.tensor(losses1), torch.tensor(losses2), rtol=1e-4, atol=1e-5), method
        assert log1[method]["dev_curve"] == log2[method]["dev_curve"]
        w1 = model.read_safetensors(tmp_path / "one" / method / "model.safetensors")
        w2 = model.read_safetensors(tmp_path / "two" / method / "model.safetensors")
        h1 = model.read_safetensors(tmp_path / "one" / method / "xlt_head.safetensors")
        h2 = model.read_safetensors(tmp_path / "two" / method / "xlt_head.safetensors")
        assert w1.keys() == w2.keys() and h1.keys() == h2.keys()
        for k in w1:
            assert torch.allclose(w1[k], w2[k], atol=2e-4), (method, k, (w1[k] - w2[k]).abs().max().item())
        for k in h1:
            assert torch.allclose(h1[k], h2[k], atol=2e-4), (method, k)
