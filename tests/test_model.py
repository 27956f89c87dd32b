"""slowft.model against Meta's published shapes and an independent Meta-style forward."""
import torch

from reference import RefLlama, load_meta
from slowft.model import ModelArgs, SeededDropout, Transformer, apply_rope, precompute_rope, swiglu, swiglu_grads

LLAMA2 = {
    "7b": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}, 11008),
    "13b": ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05, "vocab_size": -1}, 13824),
    "70b": ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
             "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}, 28672),
    "codellama-7b": ({"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "ffn_dim_multiplier": 1.0,
                      "norm_eps": 1e-5, "rope_theta": 1000000, "vocab_size": 32016}, 11008),
}


def test_params_of_meta_models():
    for name, (params, hidden) in LLAMA2.items():
        args = ModelArgs.from_params(params, vocab_size=32000)
        assert args.hidden_dim == hidden, name
        assert args.head_dim == 128, name
    assert ModelArgs.from_params(LLAMA2["70b"][0]).kv_heads == 8
    code = ModelArgs.from_params(LLAMA2["codellama-7b"][0], vocab_size=32000)
    assert code.vocab_size == 32016 and code.rope_theta == 1e6 and code.max_seq_len == 16384
    assert ModelArgs.from_params(LLAMA2["7b"][0], vocab_size=32000).vocab_size == 32000  # -1: from the tokenizer


def test_rotary_matches_meta_complex_form():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 16)
    cos, sin = precompute_rope(16, 7, 10000.0)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    fc = torch.polar(torch.ones(7, 8), torch.outer(torch.arange(7).float(), freqs))
    want = RefLlama.rotary(x, fc)
    assert torch.allclose(apply_rope(x, cos, sin), want, atol=1e-6)


def test_forward_matches_reference(gqa_model):
    import json

    weights = load_meta(gqa_model)
    params = json.loads((gqa_model / "params.json").read_text())
    args = ModelArgs.from_params(params, vocab_size=weights["output.weight"].shape[0])
    model = Transformer(args)
    model.load_state_dict({k: v for k, v in weights.items() if k != "rope.freqs"})
    ref = RefLlama(params, weights)
    tokens = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(tokens), ref(tokens), atol=1e-5)


def test_dropout_masks_depend_only_on_key():
    d = SeededDropout(0.5, seed=7, step=3)
    a = d.mask((4, 5), "cpu", 2, "ffn_out")
    assert torch.equal(a, SeededDropout(0.5, 7, 3).mask((4, 5), "cpu", 2, "ffn_out"))
    assert not torch.equal(a, d.mask((4, 5), "cpu", 2, "attn_out"))
    assert not torch.equal(a, SeededDropout(0.5, 7, 4).mask((4, 5), "cpu", 2, "ffn_out"))
    assert set(a.unique().tolist()) == {0.0, 2.0}


def test_swiglu_grads_are_autograds_bit_for_bit():
    """A block's backward takes the gate's gradients by hand (it starts from w1's and w3's
    outputs), in place where no graph needs the memory: they must be autograd's, exactly, in the
    dtypes training computes in (an odd width: vectorized loops and their tails)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x1, x3, grad = (torch.randn(3, 5, 1001, generator=g).to(dtype) for _ in range(3))
        x1.requires_grad_(True), x3.requires_grad_(True)
        a = swiglu(x1, x3)
        a.backward(grad)
        with torch.no_grad():
            assert torch.equal(swiglu(x1, x3), a), dtype
        g1, g3 = swiglu_grads(grad.clone(), x1.detach(), x3.detach())
        assert torch.equal(g1, x1.grad) and torch.equal(g3, x3.grad), dtype


def test_mean_loss_a_few_rows_at_a_time_is_the_whole_batchs_cross_entropy():
    import pytest

    from slowft.model import cross_entropy, mean_loss

    g = torch.Generator().manual_seed(0)
    weights = torch.randn(11, 7, generator=g)
    tokens = torch.randint(0, 11, (5, 6), generator=g)
    targets = torch.randint(0, 7, (5, 6), generator=g)
    targets[0, :2], targets[3, 4] = -1, -100  # not counted

    def logits(x):
        return weights[x]

    assert mean_loss(logits, tokens, targets, batch=2) == pytest.approx(cross_entropy(logits(tokens), targets).item(), rel=1e-6)
