"""bench.py: the FLOP formula by hand, and short runs of its main against transformers on a tiny shape."""
import json

import pytest

import bench
from model import Config, Encoder


def test_step_and_inference_flops_by_hand():
    # N = 1000 non-embedding parameters, L = 2 layers, H = 4, batch 3 of length 5 (15 tokens).
    # step:      6 * 1000 * 15 = 90000 dense, + 12 * L * T^2 * H per sequence = 12 * 2 * 25 * 4 * 3 = 7200
    # inference: 2 * 1000 * 15 = 30000 dense, +  4 * L * T^2 * H per sequence =  4 * 2 * 25 * 4 * 3 = 2400
    assert bench.step_flops(1000, 2, 4, 3, 5) == 97200
    assert bench.inference_flops(1000, 2, 4, 3, 5) == 32400


def test_non_embedding_params_by_hand():
    # H = 8, FF = 16, two layers. One layer: qkv 8*24+24 = 216, attn_out 8*8+8 = 72, ffn_in 8*16+16 = 144,
    # ffn_out 16*8+8 = 136, two LayerNorms 2*16 = 32: 600. Two layers 1200, embedding LayerNorm 16: 1216.
    enc = Encoder(Config(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=32))
    assert bench.non_embedding_params(enc) == 1216


def test_card_peak_lookup():
    assert bench.card_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.card_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.card_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.card_peak_tflops("Some Future Card") is None


TINY = ["--configs", "tiny", "--batch_size", "4", "--seq_len", "32", "--repeats", "2", "--warmup", "1",
        "--peak_size", "256", "--device", "cpu"]


def test_main_against_transformers(tmp_path):
    pytest.importorskip("transformers")
    lines = []
    out = bench.main(TINY + ["--padding", "0.25", "--json", str(tmp_path / "bench.json")], log=lines.append)
    r = out["results"][0]
    assert r["max_abs_diff"] < 1e-4                       # same weights, same outputs, padding included
    for kind in ("train", "infer"):
        assert r["speedup"][kind] > 0 and r["speedup_of_medians"][kind] > 0 and r["speedup_cpu_time"][kind] > 0
        for name in ("ours", "transformers"):
            assert r[name][kind]["ms"] > 0 and len(r[name][kind]["all_ms"]) == 2
        assert r["ours"][kind]["tflops"] > 0 and r["ours"][kind]["fraction_of_measured_peak"] > 0
    assert r["measured_peak_tflops"] > 0
    assert set(r["ours"]["phases_ms"]) == {"forward", "backward", "optimizer"}
    o = r["optimizer"]
    assert o["word_embedding_params"] == 1000 * 64 and o["step_ms_frozen"] > 0 and o["step_ms_trainable"] > 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["results"][0]["config"] == "tiny"
    report = "\n".join(lines)
    assert "speedup" in report and "% of measured peak" in report


def test_main_without_reference():
    out = bench.main(TINY + ["--no_reference"], log=lambda *a: None)
    r = out["results"][0]
    assert "transformers" not in r and "speedup" not in r
    assert r["ours"]["train"]["tflops"] > 0
