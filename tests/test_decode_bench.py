"""benchmarks/decode_bench.py runs end to end on CPU in its smoke form (so it is not dead code
between GPU sessions) and writes its JSON; its hand-written static-KV Llama decodes the same
logits as the reference forward; lmc's bf16 weights are read by the matmuls as stored."""
import json
import os
import sys

import torch
from conftest import ROOT, ZOO, copy_weights

import lmc

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_decode_bench_tiny_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))
    import decode_bench
    out = tmp_path / "decode.json"
    results = decode_bench.main(["--preset", "tiny", "--device", "cpu", "--tokens", "8",
                                 "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["timing"] == "cpu perf_counter" and data["torch"] and data["triton"]
    assert data["date"] and data["device"].startswith("CPU") and data["skipped"] == ["compile"]
    names = [r["name"] for r in data["results"]]
    assert names == ["pytorch static KV, eager", "lmc static step (torch backend)"]
    assert len(results) == 2 and all(r["tokens_per_s"] > 0 and r["runs"] == 3
                                     for r in data["results"])
    lmc_r = data["results"][1]
    assert lmc_r["cuda_graph"] is False and "cpu" in lmc_r["cuda_graph_off"]
    # the torch backend runs the step graph op by op: no fused ops, every op a torch one
    assert lmc_r["ops_per_step"]["fused"] == 0 and lmc_r["ops_per_step"]["torch"] > 50
    # f32 on CPU: the same weights give the same greedy tokens (32 generated)
    assert all(r["agree"] == 1.0 for r in data["results"])


def test_static_kv_reference_decodes_like_its_forward():
    from reference_llama import Llama
    from static_kv_llama import StaticKVLlama
    m = lmc.load(os.path.join(ZOO, "llama.yaml"), preset="tiny", seed=1)
    ref = Llama.from_config(m.config)
    copy_weights(m, ref)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = ref(ids)
        kv = StaticKVLlama(ref, batch=2, max_len=16)
        got = [kv(ids[:, :4], torch.arange(4))]
        for t in range(4, 9):
            got.append(kv(ids[:, t:t + 1], torch.tensor([t])))
    assert (torch.cat(got, 1) - full).abs().max().item() < 1e-5


def test_bf16_weights_are_read_as_stored():
    from lmc.ir.ops import Op
    from lmc.ir.types import DType
    from lmc.passes.mixed_precision import low_precision_weights
    c = lmc.compile_model(os.path.join(ZOO, "llama.yaml"), "tiny")
    g = low_precision_weights(c.graph)
    assert g.params and all(p.type.dtype is DType.bf16 for p in g.params)
    weights = [n.inputs[1] for n in g.nodes if n.op is Op.MATMUL and n.inputs[1].op is Op.PARAM]
    assert len(weights) == 2 * 7 + 1                      # 2 layers x 7 projections + head
    assert not [n for n in g.nodes if n.op is Op.CAST and n.inputs[0].op is Op.PARAM
                and n.type.dtype is DType.bf16]           # no per-step cast of a weight
