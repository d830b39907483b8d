"""`==` and `!=` on tensors are elementwise eq/ne (Python's == on two objects is identity: it
compiled to a constant False before)."""
import torch

import lmc
from lmc.ir.ops import Op

MODEL = """\
config: {vocab: 11, d: 8}
model:
  inputs: {ids: [B, T]}
  params: {embed: [vocab, d]}
  body:
    - x = embedding(embed, ids)
    - hit = where(ids == 3, 1.0, 0.0)
    - miss = where(3 != ids, 1.0, 0.0)
    - y = where(x != x, 0.0, reshape(hit, [B, T, 1]))
  outputs: [y, hit, miss]
"""


def test_equality_operators_on_tensors_are_elementwise(tmp_path):
    p = tmp_path / "eq.yaml"
    p.write_text(MODEL)
    m = lmc.load(str(p), seed=0)
    ops = [n.op for n in m.graph.nodes]
    assert Op.EQ in ops and Op.NE in ops
    assert not any(n.op is Op.CONST and n.type.dtype.value == "bool" for n in m.graph.nodes)
    ids = torch.tensor([[3, 1, 3, 7]])
    out = m(ids)
    want = (ids == 3).float()
    assert torch.equal(out["hit"], want) and torch.equal(out["miss"], 1 - want)
    assert torch.equal(out["y"], want[..., None].expand(1, 4, 8))
