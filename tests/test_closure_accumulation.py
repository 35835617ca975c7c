"""step(closure) keeps a gradient accumulated in p.grad before the step (issue 13, item 1).

The documented semantics (samkit.optim.core, SharpnessAware._pass): a pre-existing gradient G is the
gradient at w of samples the closure does not re-evaluate; it joins every pass of the step, so the
ascent direction is unit(G + grad L_c(w)) and G enters the final gradient exactly once.
"""

from __future__ import annotations

import torch
from optim_helpers import COUNTS, batches, clone, make_model
from reference import ce, grad_of

import samkit.optim as so


def _closure(model, opt, x, y):
    def closure():
        loss = ce(model(x), y).mean()
        loss.backward()
        return loss

    return closure


def _accumulated_step(model, opt, data):
    (x1, y1), (x2, y2) = data
    opt.zero_grad()
    ce(model(x1), y1).mean().backward()  # the accumulated micro-batch
    return opt.step(_closure(model, opt, x2, y2))


def test_plain_closure_keeps_the_accumulated_gradient_like_sgd():
    data = batches("mlp", 2)
    model = make_model("mlp")
    ref = clone(model)
    opt = so.Plain(model.parameters(), lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        _accumulated_step(model, opt, data)
        _accumulated_step(ref, sgd, data)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def _perturbed_grad(model, params, e, sign, x, y):
    with torch.no_grad():
        for p, d in zip(params, e):
            p.add_(d, alpha=sign)
    g = grad_of(ce(model(x), y).mean(), params)
    with torch.no_grad():
        for p, d in zip(params, e):
            p.sub_(d, alpha=sign)
    return g


def _reference(method, model, data, rho, a=0.0, b=0.0):
    """SGD (lr 0.1) on the documented final gradient, with G = grad L_1(w)."""
    (x1, y1), (x2, y2) = data
    params = list(model.parameters())
    held = grad_of(ce(model(x1), y1).mean(), params)
    g0 = [h + g for h, g in zip(held, grad_of(ce(model(x2), y2).mean(), params))]
    norm = torch.sqrt(sum((g * g).sum() for g in g0))
    e = [rho * g / (norm + 1e-12) for g in g0]
    g_plus = [h + g for h, g in zip(held, _perturbed_grad(model, params, e, 1.0, x2, y2))]
    if method == "sam":
        final = g_plus
    else:
        g_minus = [h + g for h, g in zip(held, _perturbed_grad(model, params, e, -1.0, x2, y2))]
        final = [
            (1 + a + b) * gp + (a - b) * gm - 2 * a * g
            for gp, gm, g in zip(g_plus, g_minus, g0)
        ]
    with torch.no_grad():
        for p, g in zip(params, final):
            p.sub_(0.1 * g)
    return final


def test_sam_and_crsam_closures_include_the_accumulated_gradient_once():
    data = batches("mlp", 2)
    for method, kwargs in [("sam", {}), ("crsam", {"a": 0.3, "b": 0.05})]:
        model = make_model("mlp")
        ref = clone(model)
        opt = so.create(method, model.parameters(), rho=0.2, lr=0.1, **kwargs)
        loss = _accumulated_step(model, opt, data)
        final = _reference(method, ref, data, 0.2, **kwargs)
        # the closure form returns the closure's loss at w, and p.grad holds the final gradient
        torch.testing.assert_close(loss, ce(make_model("mlp")(data[1][0]), data[1][1]).mean())
        for p, q, g in zip(model.parameters(), ref.parameters(), final):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-13)
            torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-13)


def test_the_accumulated_gradient_is_not_reused_by_the_next_step():
    data = batches("mlp", 3)
    model = make_model("mlp")
    ref = clone(model)
    opt = so.SAM(model.parameters(), rho=0.1, lr=0.1)
    ref_opt = so.SAM(ref.parameters(), rho=0.1, lr=0.1)
    _accumulated_step(model, opt, data[:2])
    _accumulated_step(ref, ref_opt, data[:2])
    x, y = data[2]
    opt.zero_grad()
    opt.step(_closure(model, opt, x, y))  # nothing accumulated: a plain SAM step
    ref_opt.zero_grad()
    ref_opt.step(lambda: ref(x), y)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def test_labelled_steps_replace_a_gradient_left_in_p_grad():
    """The documented rule (README): with labels, every gradient is computed by the step itself,
    so a gradient left in p.grad before the step does not enter it."""
    (x1, y1), (x2, y2) = batches("mlp", 2)
    for method in ("sam", "focalsam", "imbsam"):
        kwargs = {"class_counts": COUNTS} if method != "sam" else {}
        runs = []
        for stale in (True, False):
            model = make_model("mlp")
            opt = so.create(method, model.parameters(), rho=0.1, lr=0.1, **kwargs)
            if stale:
                ce(model(x1), y1).mean().backward()
            opt.step(lambda model=model: model(x2), y2)
            runs.append(model)
        for p, q in zip(runs[0].parameters(), runs[1].parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
