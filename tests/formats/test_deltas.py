"""Each adapter type's ΔW (`formats.deltas`) equals the lycoris-lora package's own modules on random tensors.

The reference is LyCORIS' rebuild forward: `get_weight`/`make_weight` (scaled once, as its `forward` applies it; its
`get_diff_weight` multiplies the LoHa/LoKr scale a second time, so it is not used) and `apply_weight_decompose` for
DoRA. The modules are built by `make_module_from_state_dict`, the path LyCORIS loads files with.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdlora.formats import deltas

lycoris_modules = pytest.importorskip("lycoris.modules")


@pytest.fixture(autouse=True)
def _no_grad():
    # LyCORIS builds modules from a file under no_grad (its loader copies into leaf parameters).
    with torch.no_grad():
        yield

TOL = {"rtol": 1e-6, "atol": 1e-6}


def _linear(out=12, inp=20):
    torch.manual_seed(0)
    return nn.Linear(inp, out, bias=False)


def _conv(out=12, inp=8, k=3):
    torch.manual_seed(0)
    return nn.Conv2d(inp, out, k, padding=1, bias=False)


def _rand(*shape, std=0.3):
    return torch.randn(*shape) * std


def _lycoris_delta(module):
    """ΔW exactly as the module's rebuild forward adds it (multiplier 1)."""
    with torch.no_grad():
        if isinstance(module, lycoris_modules.LoConModule):
            diff = module.make_weight() * module.scale
        else:
            diff = module.get_weight(module.shape) * module.scalar
        if module.wd:
            return module.apply_weight_decompose(module.org_weight + diff, 1.0) - module.org_weight
        return diff.reshape(module.org_weight.shape)


def _check_forward(module, org, new_weight):
    """The module's own forward equals the layer with our weight: the path a generation takes."""
    x = torch.randn(2, org.weight.shape[1], *((6, 6) if org.weight.dim() == 4 else ()))
    module.apply_to()
    with torch.no_grad():
        got = org(x)
        module.restore()
        if org.weight.dim() == 4:
            want = nn.functional.conv2d(x, new_weight, padding=1)
        else:
            want = nn.functional.linear(x, new_weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv,tucker", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_lora_locon(conv, tucker, alpha):
    org = _conv() if conv else _linear()
    out, inp = org.weight.shape[:2]
    r = 4
    if not conv:
        up, down, mid = _rand(out, r), _rand(r, inp), None
    elif tucker:
        up, down, mid = _rand(out, r, 1, 1), _rand(r, inp, 1, 1), _rand(r, r, 3, 3)
    else:  # kohya LoCon: 3x3 down, 1x1 up
        up, down, mid = _rand(out, r, 1, 1), _rand(r, inp, 3, 3), None
    ref = lycoris_modules.LoConModule.make_module_from_state_dict(
        "x", org, up, down, mid, torch.tensor(alpha if alpha is not None else 0.0), None)
    ours = deltas.layer_delta({"lora_up.weight": up, "lora_down.weight": down,
                               **({"lora_mid.weight": mid} if mid is not None else {}),
                               **({"alpha": torch.tensor(alpha)} if alpha is not None else {})},
                              base=org.weight)
    torch.testing.assert_close(ours, _lycoris_delta(ref), **TOL)
    assert ours.abs().max() > 0.05  # a zero update would pass the comparison trivially
    _check_forward(ref, org, org.weight.detach() + ours)


@pytest.mark.parametrize("conv,tucker", [(False, False), (True, False), (True, True)])
def test_loha(conv, tucker):
    org = _conv() if conv else _linear()
    out, inp = org.weight.shape[:2]
    r, alpha = 4, torch.tensor(3.0)
    if tucker:
        parts = {"hada_w1_a": _rand(r, out), "hada_w1_b": _rand(r, inp), "hada_t1": _rand(r, r, 3, 3),
                 "hada_w2_a": _rand(r, out), "hada_w2_b": _rand(r, inp), "hada_t2": _rand(r, r, 3, 3)}
    else:
        flat = inp * (9 if conv else 1)
        parts = {"hada_w1_a": _rand(out, r), "hada_w1_b": _rand(r, flat),
                 "hada_w2_a": _rand(out, r), "hada_w2_b": _rand(r, flat)}
    ref = lycoris_modules.LohaModule.make_module_from_state_dict(
        "x", org, parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"],
        parts.get("hada_t1"), parts.get("hada_t2"), alpha, None)
    assert ref.scale == pytest.approx(0.75)
    ours = deltas.layer_delta({**parts, "alpha": alpha}, base=org.weight)
    torch.testing.assert_close(ours, _lycoris_delta(ref), **TOL)
    assert ours.abs().max() > 1e-3
    _check_forward(ref, org, org.weight.detach() + ours)


# (w1 whole or a pair, w2 whole or a pair or Tucker); linear 12x20 = (3x4) ⊗ (4x5); conv 12x8 = (3x2) ⊗ (4x4).
LOKR_CASES = [
    ("linear", "w1", "w2"), ("linear", "w1", "pair"), ("linear", "pair", "pair"), ("linear", "pair", "w2"),
    ("conv", "w1", "w2"), ("conv", "w1", "pair"), ("conv", "w1", "tucker"), ("conv", "pair", "pair"),
]


@pytest.mark.parametrize("layer,first,second", LOKR_CASES)
def test_lokr(layer, first, second):
    org = _conv() if layer == "conv" else _linear()
    (a, b), (c, d) = ((3, 2), (4, 4)) if layer == "conv" else ((3, 4), (4, 5))
    k = (3, 3) if layer == "conv" else ()
    r, alpha = 2, torch.tensor(5.0)
    parts = {}
    if first == "w1":
        parts["lokr_w1"] = _rand(a, b)
    else:
        parts["lokr_w1_a"], parts["lokr_w1_b"] = _rand(a, r), _rand(r, b)
    if second == "w2":
        parts["lokr_w2"] = _rand(c, d, *k)
    elif second == "tucker":
        parts["lokr_w2_a"], parts["lokr_w2_b"], parts["lokr_t2"] = _rand(r, c), _rand(r, d), _rand(r, r, *k)
    else:
        parts["lokr_w2_a"], parts["lokr_w2_b"] = _rand(c, r), _rand(r, d * (9 if k else 1))
    want_scale = 1.0 if (first, second) == ("w1", "w2") else 2.5
    assert deltas.lokr_scale(parts.get("lokr_w1_b"), parts.get("lokr_w2_b") if second != "w2" else None,
                             alpha) == want_scale
    ours = deltas.layer_delta({**parts, "alpha": alpha}, base=org.weight)
    # LyCORIS' functional rebuild (what its module forward calls), with its own scale rule `rank_scale`.
    from lycoris.functional.lokr import _kron_weight
    from lycoris.kernels.autograd.lokr import rank_scale
    args = [parts.get(n) for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                   "lokr_t2")]
    if second == "tucker":
        # its rank_scale and loader read the rank off w2_a.size(1), which is `c` in the Tucker layout (a LyCORIS
        # bug: it cannot load such a file); ComfyUI reads it off w2_b.size(0) = r, as we do.
        scale = want_scale
    else:
        scale = rank_scale(args[1], args[4], alpha) if (first, second) != ("w1", "w2") else 1.0
        assert scale == pytest.approx(want_scale)
    want = _kron_weight(*args, scale).reshape(org.weight.shape)
    torch.testing.assert_close(ours, want, **TOL)
    assert ours.abs().max() > 1e-3
    if (layer, first, second) in {("linear", "w1", "w2"), ("linear", "w1", "pair"), ("conv", "w1", "w2")}:
        # the module path LyCORIS loads files with; it re-derives the layout from the layer's size, and on these
        # small layers only these three come out as stored
        ref = lycoris_modules.LokrModule.make_module_from_state_dict("x", org, *args[:6], None, None, alpha, None)
        assert ref.scale == pytest.approx(want_scale)
        torch.testing.assert_close(ours, _lycoris_delta(ref), **TOL)
        _check_forward(ref, org, org.weight.detach() + ours)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("conv", [False, True])
def test_dora_per_output_row(algo, conv):
    org = _conv() if conv else _linear()
    w = org.weight.detach()
    out, inp = w.shape[:2]
    flat = inp * (9 if conv else 1)
    r = 4
    # magnitudes near the base's row norms, as a trained DoRA has them: (out, 1[, 1, 1]), LyCORIS' wd_on_out layout
    m = w.reshape(out, -1).norm(dim=1).reshape(out, *[1] * (w.dim() - 1)) * (1 + _rand(out, *[1] * (w.dim() - 1)))
    if algo == "lora":
        parts = {"lora_up.weight": _rand(out, r, *((1, 1) if conv else ())),
                 "lora_down.weight": _rand(r, inp, *((3, 3) if conv else ()))}
        ref = lycoris_modules.LoConModule.make_module_from_state_dict(
            "x", org, parts["lora_up.weight"], parts["lora_down.weight"], None, torch.tensor(2.0), m)
    elif algo == "loha":
        parts = {"hada_w1_a": _rand(out, r), "hada_w1_b": _rand(r, flat),
                 "hada_w2_a": _rand(out, r), "hada_w2_b": _rand(r, flat)}
        ref = lycoris_modules.LohaModule.make_module_from_state_dict(
            "x", org, *parts.values(), None, None, torch.tensor(2.0), m)
    else:
        (a, b), (c, d) = ((3, 2), (4, 4)) if conv else ((3, 4), (4, 5))
        # layouts LyCORIS' loader rebuilds on these small layers (see test_lokr)
        if conv:
            parts = {"lokr_w1": _rand(a, b), "lokr_w2": _rand(c, d, 3, 3)}
        else:
            parts = {"lokr_w1": _rand(a, b), "lokr_w2_a": _rand(c, 2), "lokr_w2_b": _rand(2, d)}
        ref = lycoris_modules.LokrModule.make_module_from_state_dict(
            "x", org, parts["lokr_w1"], None, None, parts.get("lokr_w2"), parts.get("lokr_w2_a"),
            parts.get("lokr_w2_b"), None, None, torch.tensor(1.0), m)
    assert ref.wd and ref.wd_on_out
    ours = deltas.layer_delta({**parts, "alpha": torch.tensor(2.0 if algo != "lokr" else 1.0), "dora_scale": m},
                              base=w)
    torch.testing.assert_close(ours, _lycoris_delta(ref), **TOL)
    new = w + ours
    torch.testing.assert_close(new.reshape(out, -1).norm(dim=1), m.reshape(-1), rtol=1e-5, atol=1e-5)
    _check_forward(ref, org, new)


def test_dora_per_input_column_matches_lycoris_wd_on_in():
    org = _linear()
    w = org.weight.detach()
    up, down = _rand(12, 4), _rand(4, 20)
    m = w.norm(dim=0, keepdim=True) * 1.3  # (1, in): LyCORIS with wd_on_out=False, and older LyCORIS files
    ref = lycoris_modules.LoConModule("x", org, 1.0, 4, 4.0, weight_decompose=True, wd_on_out=False)
    with torch.no_grad():
        ref.lora_up.weight.copy_(up)
        ref.lora_down.weight.copy_(down)
        ref.dora_scale.copy_(m)
    ours = deltas.layer_delta({"lora_up.weight": up, "lora_down.weight": down, "dora_scale": m}, base=w)
    torch.testing.assert_close(ours, _lycoris_delta(ref), **TOL)
    torch.testing.assert_close((w + ours).norm(dim=0), m.reshape(-1), rtol=1e-5, atol=1e-5)


def test_dora_weight_interpolates_from_base_and_weights_add():
    w = _linear().weight.detach()
    delta, m = _rand(12, 20), w.norm(dim=1, keepdim=True) * 1.5
    full = deltas.dora_weight(w, delta, m)
    torch.testing.assert_close(deltas.dora_weight(w, delta, m, 0.0), w)
    torch.testing.assert_close(deltas.dora_weight(w, delta, m, 0.7) - w, 0.7 * (full - w))


def test_layer_algo_and_plain_weight():
    assert deltas.layer_algo({"lokr_w1": 0, "alpha": 0}) == "lokr"
    assert deltas.layer_algo({"hada_w1_a": 0}) == "loha"
    assert deltas.layer_algo({"lora_up.weight": 0}) == "lora"
    assert deltas.layer_algo({"alpha": 0}) is None
    up, down = _rand(6, 2), _rand(2, 5)
    got = deltas.layer_delta({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0)},
                             multiplier=0.4)
    torch.testing.assert_close(got, 0.4 * 0.5 * up @ down)
