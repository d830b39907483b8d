"""`for` loops are unrolled into the graph: a long one compiles and runs (the passes and code
generators recurse along a chain of thousands of ops), an absurd one is a one-line error."""
import torch

import lmc
from lmc.cli import main

CHAIN = """\
model:
  inputs: {{ids: [B, T]}}
  params: {{embed: [10, 4]}}
  body:
    - x = embedding(embed, ids)
    - for: i
      in: {n}
      body:
        - x = x * 0.999 + 1
  outputs: [x]
"""


def test_a_chain_of_thousands_of_ops_compiles_and_runs_on_both_backends(tmp_path, capsys):
    p = tmp_path / "chain.yaml"
    p.write_text(CHAIN.format(n=1500))
    assert main(["compile", str(p)]) == 0
    capsys.readouterr()
    ids = torch.randint(0, 10, (2, 3))
    want = lmc.load(str(p), seed=1)(ids)
    got = lmc.load(str(p), seed=1, backend="triton")(ids)
    want, got = (v["x"] if isinstance(v, dict) else v for v in (want, got))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_an_absurd_loop_count_is_an_error_not_a_hang(tmp_path, capsys):
    p = tmp_path / "big.yaml"
    p.write_text(CHAIN.format(n=100_000_000))
    assert main(["compile", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{p}:7:11: error: for ... in: 100,000,000 iterations"), err
    assert "\n" not in err
