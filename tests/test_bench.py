"""bench.py: the FLOP formula by hand, short runs of its main against transformers on a tiny shape, bad flags."""
import json

import pytest

import bench
import model as M


def test_step_and_inference_flops_by_hand():
    # N = 1000 non-embedding parameters, L = 2 layers, H = 4, batch 3 of length 5 (15 tokens).
    # step:      6 * 1000 * 15 = 90000 dense, + 12 * L * T^2 * H per sequence = 12 * 2 * 25 * 4 * 3 = 7200
    # inference: 2 * 1000 * 15 = 30000 dense, +  4 * L * T^2 * H per sequence =  4 * 2 * 25 * 4 * 3 = 2400
    assert bench.step_flops(1000, 2, 4, 3, 5) == 97200
    assert bench.inference_flops(1000, 2, 4, 3, 5) == 32400


def test_non_embedding_params_by_hand():
    # H = 8, FF = 16, two layers. One layer: qkv 8*24+24 = 216, attn_out 8*8+8 = 72, ffn_in 8*16+16 = 144,
    # ffn_out 16*8+8 = 136, two LayerNorms 2*16 = 32: 600. Two layers 1200, embedding LayerNorm 16: 1216.
    enc = M.Encoder(M.Config(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=32))
    assert bench.non_embedding_params(enc) == 1216


def test_card_peak_lookup():
    assert bench.card_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.card_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.card_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.card_peak_tflops("Some Future Card") is None


TINY = ["--configs", "tiny", "--batch_size", "4", "--seq_len", "32", "--repeats", "2", "--warmup_rounds", "1",
        "--peak_size", "256", "--device", "cpu"]


def test_main_against_transformers(tmp_path):
    pytest.importorskip("transformers")
    lines = []
    out = bench.main(TINY + ["--json", str(tmp_path / "bench.json")], log=lines.append)
    r = out["results"][0]
    assert r["max_abs_diff"] < 1e-4                       # same weights, same outputs (padding: tests/test_model.py)
    for kind in ("train", "infer"):
        assert r["speedup"][kind] > 0 and r["speedup_cpu_time"][kind] > 0
        for name in ("ours", "transformers"):
            assert r[name][kind]["ms"] > 0 and len(r[name][kind]["all_ms"]) == 2
        assert r["ours"][kind]["tflops"] > 0 and r["ours"][kind]["fraction_of_measured_peak"] > 0
    assert r["measured_peak_tflops"] > 0
    assert set(r["ours"]["phases_ms"]) == {"forward", "backward", "optimizer"}
    assert set(r["transformers"]["phases_ms"]) == {"forward", "backward", "optimizer"}
    o = r["optimizer"]
    assert o["word_embedding_params"] == 1000 * 64 and o["step_ms_frozen"] > 0 and o["step_ms_trainable"] > 0
    assert o["word_embedding_grad_ms"] > 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["results"][0]["config"] == "tiny" and saved["meta"]["transformers"]
    report = "\n".join(lines)
    assert "speedup" in report and "% of measured peak" in report


def test_main_without_reference():
    out = bench.main(TINY + ["--no_reference", "--peak_tflops", "1"], log=lambda *a: None)
    r = out["results"][0]
    assert "transformers" not in r and "speedup" not in r
    assert r["ours"]["train"]["tflops"] > 0
    assert r["ours"]["train"]["mfu"] == pytest.approx(r["ours"]["train"]["tflops"])    # MFU against 1 TFLOP/s


def test_main_with_frozen_word_embeddings():
    out = bench.main(TINY + ["--no_reference", "--freeze_word_embeddings", "--repeats", "1"], log=lambda *a: None)
    r = out["results"][0]
    assert r["ours"]["train"]["ms"] > 0 and r["optimizer"]["step_ms_frozen"] > 0


@pytest.mark.parametrize("bad", [["--batch_size", "0"], ["--seq_len", "-1"], ["--repeats", "0"],
                                 ["--warmup_rounds", "-1"], ["--peak_size", "0"], ["--peak_tflops", "0"],
                                 ["--dropout", "1"], ["--device", "gpu"], ["--configs", "huge"]])
def test_bad_flags_are_refused_by_argparse(bad):
    with pytest.raises(SystemExit) as e:
        bench.main(bad)
    assert e.value.code == 2


def test_seq_len_beyond_the_shape_is_one_clear_error():
    with pytest.raises(M.XltError, match="--seq_len 129 exceeds the tiny shape's 128 positions"):
        bench.main(["--configs", "tiny", "--seq_len", "129", "--device", "cpu"], log=lambda *a: None)
