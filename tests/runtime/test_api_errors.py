"""Library API mistakes an audit found raising internal exceptions (AttributeError, a torch
IndexError after some tokens, a string read character by character): each is one LmcError
naming the mistake, at the call."""
import functools
import os

import pytest
import torch
from conftest import ZOO

import lmc
from lmc.errors import LmcError
from lmc.runtime.decoder import Decoder
from lmc.runtime.module import LmcModel

LLAMA = os.path.join(ZOO, "llama.yaml")


@pytest.fixture(scope="module")
def model():
    return lmc.load(LLAMA, "tiny").eval()


def test_a_state_belongs_to_its_decoder(model):
    ids = torch.randint(0, 512, (1, 3), generator=torch.Generator().manual_seed(0))
    dyn = Decoder(model)
    s8, s16 = (Decoder(model, static=True, max_len=n) for n in (8, 16))
    for dec, other in ((s8, dyn), (s16, s8), (dyn, s8)):
        with pytest.raises(LmcError, match="this state was made by another decoder"):
            dec(ids, other.init_state(1))
    logits, state = dyn(ids, dyn.init_state(1))      # the dynamic step's new state is its own
    logits, state = dyn(ids[:, :1], state)
    assert logits.shape == (1, 1, 512) and state.past == 4


def test_generate_checks_its_arguments_at_the_call(model):
    dec = Decoder(model, static=True, max_len=8)
    with pytest.raises(LmcError, match="must be a 1-D tensor of token ids, got list"):
        dec.generate([1, 2], 2)
    # (a generator checked only when iterated, failing after the tokens that fit)
    with pytest.raises(LmcError, match=r"\(3 tokens\) \+ 7 new ones exceed the decoder's "
                                       "max_len 8"):
        dec.generate(torch.tensor([1, 2, 3]), 7)
    with pytest.raises(LmcError, match="bad max_new_tokens=-1"):
        dec.generate(torch.tensor([1]), -1)
    assert len(list(dec.generate(torch.tensor([1, 2, 3]), 6, temperature=0))) == 6


def test_wrong_objects_and_strings_for_lists():
    def f(b, x, *, k=2):
        return x
    for call, msg in ((lambda: lmc.block(functools.partial(f, k=3)), "has no __name__"),
                      (lambda: lmc.block(len), "takes a function"),
                      (lambda: Decoder(LLAMA), "Decoder takes a model from lmc.load"),
                      (lambda: Decoder(lmc.load(LLAMA, "tiny"), static="no"),
                       "static must be True or False")):
        with pytest.raises(LmcError, match=msg):
            call()
    c = lmc.compile_model(LLAMA, "tiny", "d=32", disable="cse")    # one string, not chars
    assert c.graph.meta["config"]["d"] == 32
    with pytest.raises(LmcError, match=r"LmcModel takes a Graph, got Compiled \(pass its "
                                       r"\.graph"):
        LmcModel(c)
    m = LmcModel(c.graph, freeze="embed", grad_outputs="logits")
    assert m.frozen == {"embed"} and m.grad_outputs == ["logits"]


@pytest.mark.parametrize("static", [False, True])
def test_ids_and_state_batch_must_agree(model, static):
    dec = Decoder(model, static=True, max_len=8) if static else Decoder(model)
    state = dec.init_state(2)
    with pytest.raises(LmcError, match=r"the ids hold 3 sequence\(s\) but the state was made "
                                       r"for 2: init_state\(3\)"):
        dec(torch.zeros(3, 2, dtype=torch.long), state)
    logits, state = dec(torch.zeros(2, 2, dtype=torch.long), state)   # the state is untouched
    assert logits.shape == (2, 2, 512) and state.past == 2 and state.batch == 2


@pytest.mark.parametrize("bad", [512, 10**6, -1])
def test_a_token_id_out_of_the_vocabulary_is_named(model, bad):
    ids = torch.tensor([[1, bad, 2]])
    msg = rf"token id {bad} is out of range: the embedding table has 512 rows \(ids 0\.\.511\)"
    with pytest.raises(LmcError, match=msg):
        model(ids)
    dec = Decoder(model)
    with pytest.raises(LmcError, match=msg):
        dec(ids, dec.init_state(1))
    with pytest.raises(LmcError, match=msg):
        list(dec.generate(ids[0], 1))
    model(ids.clamp(0, 511))        # in range: runs


def test_cuda_graph_true_where_none_can_be_captured_is_an_error(model):
    """cuda_graph=True asks for the capture: on a CPU it is refused at once (it used to
    behave as None, falling back quietly); None falls back and says why."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine can capture")
    with pytest.raises(LmcError, match=r"cuda_graph=True, but the model is on cpu; CUDA "
                                       r"graphs need a CUDA device"):
        Decoder(model, static=True, max_len=8, cuda_graph=True)
    dec = Decoder(model, static=True, max_len=8)
    assert dec.cuda_graph is False and "CUDA device" in dec.cuda_graph_off


def test_lmc_exports_the_model_and_the_decoder():
    assert lmc.Decoder is Decoder and lmc.LmcModel is LmcModel
    with pytest.raises(AttributeError, match="no attribute 'Decodr'"):
        lmc.Decodr
