"""Reference implementations of every method, written plainly from spec/ALGORITHMS.md.

Explicit per-parameter loops, gradients by torch.autograd.grad, no code shared with samkit. Each
function computes the final gradient of one step, puts it in p.grad and calls the base optimizer
once. Models are expected to expose `features(x)` and `head` (a torch.nn.Linear).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def grad_of(loss, params, retain=False):
    gs = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def global_norm(gs):
    total = 0.0
    for g in gs:
        total += float((g.double() ** 2).sum())
    return math.sqrt(total)


def params_of(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def unit_perturbation(opt, gs, key="rho", adaptive=False, eta=0.0, scaled=None):
    """e_p = rho_group * g_p / (||g|| + 1e-12), or ASAM's rho T^2 g / ||T g||, where T_p = |w_p| + eta
    for the parameters p with scaled[p] (all by default) and T_p = 1 for the others."""
    out = []
    if adaptive:
        params = params_of(opt)
        if scaled is None:
            scaled = [True] * len(params)
        ts = [p.detach().abs() + eta if on else 1.0 for p, on in zip(params, scaled)]
        tg = [t * g for t, g in zip(ts, gs)]
        n = global_norm(tg)
        k = 0
        for group in opt.param_groups:
            for _ in group["params"]:
                out.append(group[key] * ts[k] * tg[k] / (n + 1e-12))
                k += 1
        return out
    n = global_norm(gs)
    k = 0
    for group in opt.param_groups:
        for _ in group["params"]:
            out.append(group[key] * gs[k] / (n + 1e-12))
            k += 1
    return out


class At:
    """Move the parameters to w + sign * e, and back by copy."""

    def __init__(self, params, e, sign=1.0, freeze=None):
        self.params, self.e, self.sign, self.freeze = params, e, sign, freeze

    def __enter__(self):
        self.saved = [p.detach().clone() for p in self.params]
        self.stats = None
        if self.freeze is not None:
            self.stats = {
                k: v.clone()
                for k, v in self.freeze.state_dict().items()
                if "running" in k or "num_batches" in k
            }
        with torch.no_grad():
            for p, e in zip(self.params, self.e):
                p.add_(self.sign * e)

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, w in zip(self.params, self.saved):
                p.copy_(w)
        if self.stats is not None:
            self.freeze.load_state_dict(self.stats, strict=False)


def finish(opt, final):
    for p, g in zip(params_of(opt), final):
        p.grad = g.clone()
    opt.step()


def plain(model, opt, x, y):
    params = params_of(opt)
    finish(opt, grad_of(ce(model(x), y).mean(), params))


def sam(model, opt, x, y, adaptive=False, eta=0.0, freeze=False, scaled=None):
    params = params_of(opt)
    g = grad_of(ce(model(x), y).mean(), params)
    with At(
        params,
        unit_perturbation(opt, g, adaptive=adaptive, eta=eta, scaled=scaled),
        freeze=model if freeze else None,
    ):
        g_adv = grad_of(ce(model(x), y).mean(), params)
    finish(opt, g_adv)


def imbsam(model, opt, x, y, counts, eta=20, kappa=1.0, key="rho", average="batch"):
    """average "batch": both group losses divided by B; "group": the head loss is the mean over the
    batch's head samples, the tail loss the mean over its tail samples (0 for an absent group)."""
    params = params_of(opt)
    tail_classes = [c for c, n in enumerate(counts) if n < eta]
    is_tail = torch.tensor([float(int(v) in tail_classes) for v in y], dtype=x.dtype)
    losses = ce(model(x), y)
    n_tail = int(is_tail.sum())
    n_head = len(y) - n_tail
    b_head = max(n_head, 1) if average == "group" else len(y)
    b_tail = max(n_tail, 1) if average == "group" else len(y)
    g_head = grad_of(((1 - is_tail) * losses).sum() / b_head, params, retain=True)
    g_tail = grad_of((is_tail * losses).sum() / b_tail, params)
    with At(params, unit_perturbation(opt, g_tail, key=key)):
        g_tail_adv = grad_of(kappa * (is_tail * ce(model(x), y)).sum() / b_tail, params)
    finish(opt, [a + c for a, c in zip(g_head, g_tail_adv)])


def focalsam(model, opt, x, y, counts, gamma, lam):
    params = params_of(opt)
    total = sum(counts)
    c = torch.tensor([lam * (1 - counts[int(v)] / total) ** gamma for v in y], dtype=x.dtype)
    losses = ce(model(x), y)
    b = len(y)
    g_clean = grad_of(((1 - c) * losses).sum() / b, params, retain=True)
    g_focal = grad_of((c * losses).sum() / b, params)
    with At(params, unit_perturbation(opt, g_focal)):
        g_adv = grad_of((c * ce(model(x), y)).sum() / b, params)
    finish(opt, [a + d for a, d in zip(g_clean, g_adv)])


def ssesam(model, opt, x, y, counts, epoch, total_epochs, gamma=0.7, eta=100):
    if epoch >= gamma * total_epochs:
        return imbsam(model, opt, x, y, counts, eta=eta, kappa=1.0, key="rho_tail")
    params = params_of(opt)
    is_tail = torch.tensor([float(counts[int(v)] < eta) for v in y], dtype=x.dtype)
    is_head = 1 - is_tail
    losses = ce(model(x), y)
    b = len(y)
    g_h = grad_of((is_head * losses).sum() / b, params, retain=True)
    g_t = grad_of((is_tail * losses).sum() / b, params)
    with At(params, unit_perturbation(opt, g_h, key="rho_head")):
        g_h_adv = grad_of((is_head * ce(model(x), y)).sum() / b, params)
    with At(params, unit_perturbation(opt, g_t, key="rho_tail")):
        g_t_adv = grad_of((is_tail * ce(model(x), y)).sum() / b, params)
    finish(opt, [a + c for a, c in zip(g_h_adv, g_t_adv)])


def bisam_q(logits, y, bound, mu, alpha):
    rows = []
    for i in range(logits.shape[0]):
        terms = []
        for j in range(logits.shape[1]):
            f = logits[i, j] - logits[i, y[i]]
            if bound == "log":
                phi = 1 - torch.log1p(torch.exp(math.log(math.e - 1) - f))
            else:
                phi = torch.tanh(alpha * f)
            terms.append(torch.exp(mu * phi))
        rows.append(torch.log(torch.stack(terms).sum()) / mu)
    return torch.stack(rows)


def bisam_smoothed_ce(logits, y, s=0.1):
    """The BiSAM authors' descent loss: 1 - s on the target, s / (K - 1) on each other class."""
    k = logits.shape[1]
    log_p = torch.log_softmax(logits, dim=1)
    rows = []
    for i in range(logits.shape[0]):
        target = torch.zeros(k, dtype=logits.dtype)
        for j in range(k):
            target[j] = 1 - s if j == int(y[i]) else s / (k - 1)
        rows.append(-(target * log_p[i]).sum())
    return torch.stack(rows)


def bisam(model, opt, x, y, bound="log", mu=1.0, alpha=0.1, descent=ce):
    params = params_of(opt)
    g_q = grad_of(bisam_q(model(x), y, bound, mu, alpha).mean(), params)
    with At(params, unit_perturbation(opt, g_q)):
        g = grad_of(descent(model(x), y).mean(), params)
    finish(opt, g)


def crsam(model, opt, x, y, a, b, stats="update"):
    """stats: "update" (every pass updates the running statistics), "freeze" (both perturbed
    passes restored), "authors" (the pass at w + e restored, the one at w - e updates them)."""
    params = params_of(opt)
    g0 = grad_of(ce(model(x), y).mean(), params)
    e = unit_perturbation(opt, g0)
    with At(params, e, +1.0, freeze=None if stats == "update" else model):
        gp = grad_of(ce(model(x), y).mean(), params)
    with At(params, e, -1.0, freeze=model if stats == "freeze" else None):
        gm = grad_of(ce(model(x), y).mean(), params)
    finish(opt, [p + a * (p + m - 2 * z) + b * (p - m) for p, m, z in zip(gp, gm, g0)])


def _rho_c(w_norm, g_norm, k, n_c):
    return math.sqrt(w_norm / (2 * (g_norm + 1e-12))) * k**-0.25 * (n_c - 1) ** -0.25


def ccsam_classifier(model, opt, x, y, counts, s, beta, variant="authors"):
    """variant "authors" (zzpustc/CC-SAM, train_cifar.py): g_c from class c's mean loss over its
    samples in the batch; each head tensor t (weight, bias) gets its own radius from its own norms,
    rho_{c,t} = sqrt(||W_t|| / (2 ||g_{c,t}||)) k^(-1/4) (n_c - 1)^(-1/4), k the whole head's size,
    and e_{c,t} = s sqrt(k) rho_{c,t} g_{c,t} / ||g_{c,t}||; "joint": g_c from class c's loss summed
    over the batch and divided by B, one radius and one norm over weight and bias together."""
    params = params_of(opt)
    head = model.head
    f = model.features(x)
    losses = ce(head(f), y)
    b = len(y)
    weights = [head.weight, head.bias]
    k = sum(w.numel() for w in weights)
    w_norm = global_norm([w.detach() for w in weights])
    e = {}
    for c in range(len(counts)):
        mask = (y == c).to(x.dtype)
        divisor = max(int(mask.sum()), 1) if variant == "authors" else b
        g_c = grad_of((mask * losses).sum() / divisor, weights, retain=True)
        n = global_norm(g_c)
        rho = _rho_c(w_norm, n, k, counts[c])
        if variant == "authors":
            e[c] = [s * math.sqrt(k) * _rho_c(global_norm([w.detach()]), global_norm([g]), k,
                                               counts[c]) * g / (global_norm([g]) + 1e-12)
                    for w, g in zip(weights, g_c)]
        else:
            e[c] = [s * math.sqrt(k) * rho * g / (n + 1e-12) for g in g_c]
    perturbed = []
    for i in range(b):
        ew, eb = e[int(y[i])]
        z = F.linear(f[i : i + 1], head.weight + ew, head.bias + eb)
        perturbed.append(ce(z, y[i : i + 1])[0])
    loss = (1 - beta) * losses.mean() + beta * torch.stack(perturbed).sum() / b
    finish(opt, grad_of(loss, params))


def ccsam_full(model, opt, x, y, counts, s, beta):
    params = params_of(opt)
    losses = ce(model(x), y)
    b = len(y)
    final = grad_of((1 - beta) * losses.mean(), params, retain=True)
    k = sum(p.numel() for p in params)
    w_norm = global_norm([p.detach() for p in params])
    present = sorted({int(v) for v in y})
    g_cs = {}
    for c in present:
        mask = (y == c).to(x.dtype)
        g_cs[c] = grad_of((mask * losses).sum() / b, params, retain=True)
    for c in present:
        n = global_norm(g_cs[c])
        rho = _rho_c(w_norm, n, k, counts[c])
        e = [s * math.sqrt(k) * rho * g / (n + 1e-12) for g in g_cs[c]]
        with At(params, e):
            mask = (y == c).to(x.dtype)
            g = grad_of(beta * (mask * ce(model(x), y)).sum() / b, params)
        final = [a + d for a, d in zip(final, g)]
    finish(opt, final)


# ---- the efficient variants (spec/ALGORITHMS-EFFICIENT.md) ---------------------------------------
# Stateful methods keep their state on the reference optimizer object, in `opt.ref_state`.


def ref_state(opt):
    if not hasattr(opt, "ref_state"):
        opt.ref_state = {}
    return opt.ref_state


def dot(a, b):
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


class FrozenStats:
    """Restore the model's BatchNorm running statistics on exit."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.saved = {
            k: v.clone()
            for k, v in self.model.state_dict().items()
            if "running" in k or "num_batches" in k
        }

    def __exit__(self, *exc):
        self.model.load_state_dict(self.saved, strict=False)


def msam(model, opt, x, y, decay_at="w"):
    """The model holds w~ = w - s v; s stored per group, v the base's momentum (or Adam's m)."""
    params = params_of(opt)
    state = ref_state(opt)
    key = "momentum_buffer" if isinstance(opt, torch.optim.SGD) else "exp_avg"
    g = grad_of(ce(model(x), y).mean(), params)
    wds = [group["weight_decay"] for group in opt.param_groups]
    if decay_at == "perturbed":
        g = [gi + wds[0] * p.detach() for gi, p in zip(g, params)]
        opt.param_groups[0]["weight_decay"] = 0.0
    scales = state.get("s", [0.0] * len(opt.param_groups))
    with torch.no_grad():
        for group, s in zip(opt.param_groups, scales):
            for p in group["params"]:
                v = opt.state.get(p, {}).get(key)
                if v is not None:
                    p.add_(s * v)
    finish(opt, g)
    opt.param_groups[0]["weight_decay"] = wds[0]
    norm = global_norm([opt.state[p][key] for p in params])
    state["s"] = [group["rho"] / (norm + 1e-12) for group in opt.param_groups]
    with torch.no_grad():
        for group, s in zip(opt.param_groups, state["s"]):
            for p in group["params"]:
                p.sub_(s * opt.state[p][key])


def ksam(model, opt, x, y, k, subset=True, graph=False):
    """SAM on the top-k losses; BN statistics updated by the ranking forward only."""
    params = params_of(opt)
    if graph:
        losses = ce(model(x), y)
    else:
        with torch.no_grad():
            losses = ce(model(x), y)
    top = torch.topk(losses.detach(), k).indices

    def loss_on_top():
        if subset:
            return ce(model(x[top]), y[top]).sum() / k
        return ce(model(x), y)[top].sum() / k

    with FrozenStats(model):
        g = grad_of(losses[top].sum() / k, params) if graph else grad_of(loss_on_top(), params)
        with At(params, unit_perturbation(opt, g)):
            g_p = grad_of(loss_on_top(), params)
    finish(opt, g_p)


def bsam(model, opt, x, y, min_scale="norm_ratio"):
    params = params_of(opt)
    g0 = grad_of(ce(model(x), y).mean(), params)
    with At(params, unit_perturbation(opt, g0, key="rho_max")):
        g_max = grad_of(ce(model(x), y).mean(), params)
    with At(params, unit_perturbation(opt, g0, key="rho_min"), -1.0):
        g_min = grad_of(ce(model(x), y).mean(), params)
    r = global_norm(g_max) / (global_norm(g_min) + 1e-12) if min_scale == "norm_ratio" else 1.0
    finish(opt, [a + b - r * c for a, b, c in zip(g_max, g0, g_min)])


def gsam(model, opt, x, y, alpha):
    params = params_of(opt)
    rho_t = []  # per parameter: its group's radius at the group's lr
    for group in opt.param_groups:
        frac = (group["lr"] - group["lr_min"]) / (group["lr_max"] - group["lr_min"])
        rho = group["rho_min"] + (group["rho"] - group["rho_min"]) * frac
        rho_t += [rho] * len(group["params"])
    g = grad_of(ce(model(x), y).mean(), params)
    n = global_norm(g)
    with At(params, [r * gi / (n + 1e-12) for r, gi in zip(rho_t, g)]):
        g_p = grad_of(ce(model(x), y).mean(), params)
    coef = dot(g, g_p) / (dot(g_p, g_p) + 1e-12)
    g_perp = [a - coef * b for a, b in zip(g, g_p)]
    finish(opt, [b - alpha * c for b, c in zip(g_p, g_perp)])


def looksam(model, opt, x, y, k, alpha):
    params = params_of(opt)
    state = ref_state(opt)
    t = state.get("t", 0)
    g = grad_of(ce(model(x), y).mean(), params)
    if t % k == 0:
        with At(params, unit_perturbation(opt, g)):
            g_s = grad_of(ce(model(x), y).mean(), params)
        coef = dot(g_s, g) / max(dot(g, g), 1e-300)
        state["g_v"] = [a - coef * b for a, b in zip(g_s, g)]
        d = g_s
    else:
        ratio = alpha * global_norm(g) / (global_norm(state["g_v"]) + 1e-12)
        d = [a + ratio * v for a, v in zip(g, state["g_v"])]
    state["t"] = t + 1
    finish(opt, d)


def fsam(model, opt, x, y, sigma, lam, ema_order="code"):
    params = params_of(opt)
    state = ref_state(opt)
    g = grad_of(ce(model(x), y).mean(), params)
    m_old = state.get("m")
    if ema_order == "code":
        d = g if m_old is None else [a - sigma * m for a, m in zip(g, m_old)]
        m_new = g if m_old is None else [lam * m + (1 - lam) * a for a, m in zip(g, m_old)]
    else:
        m_old = m_old or [torch.zeros_like(a) for a in g]
        m_new = [lam * m + (1 - lam) * a for a, m in zip(g, m_old)]
        d = [a - sigma * m for a, m in zip(g, m_new)]
    state["m"] = m_new
    with At(params, unit_perturbation(opt, d)):
        g_adv = grad_of(ce(model(x), y).mean(), params)
    finish(opt, g_adv)


# ---- the cost options (spec/ALGORITHMS-EFFICIENT.md, "Generic options for any unified-form method")


def _fresh(state, every, schedule, seed):
    """Whether this step takes a fresh ascent: t mod K = 0 (every_K) or a draw with p = 1/K
    (bernoulli, one draw per step when K > 1), and always while no direction is stored."""
    state.setdefault("t", 0)
    state.setdefault("gen", torch.Generator().manual_seed(seed))
    if every == 1:
        return True
    if schedule == "every_K":
        fresh = state["t"] % every == 0
    else:
        fresh = bool(torch.rand((), generator=state["gen"]) < 1.0 / every)
    return fresh or "u" not in state


def _subset(state, c, losses, m, mode):
    """S: m_j = min(m, #eligible) samples among those with c_b != 0; random: the first m_j of a
    torch.randperm of the eligible samples (batch order) drawn from the seeded generator; topk: the
    largest c_b l_b(w)."""
    eligible = [b for b in range(len(c)) if float(c[b]) != 0]
    m_j = min(m, len(eligible))
    if mode == "random":
        order = torch.randperm(len(eligible), generator=state["gen"])[:m_j]
        return sorted(eligible[int(i)] for i in order)
    scores = {b: float(c[b] * losses[b].detach()) for b in eligible}
    return sorted(sorted(eligible, key=lambda b: -scores[b])[:m_j])


def unified_cost(
    model,
    opt,
    x,
    y,
    a,
    c,
    every=1,
    between="reuse_e",
    schedule="every_K",
    subset=None,
    mode="random",
    graph=False,
    seed=0,
):
    """One step of g = grad (1/B) sum a_b l_b(w) + grad (1/B) sum c_b l_b(w + e) (a None: no clean
    term) with the cost options. A (every): fresh steps store u = unit(ascent gradient); other steps
    take e = rho(t) u with rho(t) read now ("reuse_e", the clean term still at w when some a_b != 0)
    or the plain step on (a + c) l at w ("base"). B (subset): u = unit(grad (1/m_j) sum_S c_b l_b(w)),
    from a forward on S alone, or (graph) from the forward at w masked to S."""
    params = params_of(opt)
    state = ref_state(opt)
    b = len(y)
    rho = opt.param_groups[0]["rho"]
    fresh = _fresh(state, every, schedule, seed)
    g_a = None
    if not fresh and between == "base":
        total = c if a is None else a + c
        finish(opt, grad_of((total * ce(model(x), y)).sum() / b, params))
        state["t"] += 1
        return
    if not fresh:
        if a is not None and bool((a != 0).any()):
            g_a = grad_of((a * ce(model(x), y)).sum() / b, params)
        e = [rho * u for u in state["u"]]
    else:
        if subset is None:
            losses = ce(model(x), y)
            if a is not None:
                g_a = grad_of((a * losses).sum() / b, params, retain=True)
            g_asc = grad_of((c * losses).sum() / b, params)
        else:
            m = subset if isinstance(subset, int) else max(1, math.floor(subset * b))
            losses = None
            if a is not None or graph:
                losses = ce(model(x), y)
            elif mode == "topk":
                with torch.no_grad():
                    losses = ce(model(x), y)
            s = _subset(state, c, losses, m, mode)
            if graph:
                mask = torch.zeros(b, dtype=x.dtype)
                mask[s] = 1.0
                if a is not None:
                    g_a = grad_of((a * losses).sum() / b, params, retain=True)
                g_asc = grad_of((mask * c * losses).sum() / b, params)
            else:
                if a is not None:
                    g_a = grad_of((a * losses).sum() / b, params)
                if s:
                    g_asc = grad_of((c[s] * ce(model(x[s]), y[s])).sum() / len(s), params)
                else:
                    g_asc = [torch.zeros_like(p) for p in params]
        n = global_norm(g_asc)
        state["u"] = [g / (n + 1e-12) for g in g_asc]
        e = [rho * u for u in state["u"]]
    with At(params, e):
        g_adv = grad_of((c * ce(model(x), y)).sum() / b, params)
    finish(opt, g_adv if g_a is None else [p + q for p, q in zip(g_a, g_adv)])
    state["t"] += 1


def sam_cost(model, opt, x, y, **options):
    """SAM with the cost options: no clean term, c_b = 1."""
    unified_cost(model, opt, x, y, None, torch.ones(len(y), dtype=x.dtype), **options)


def imbsam_cost(model, opt, x, y, counts, eta=20, kappa=1.0, **options):
    """ImbSAM (average "batch") with the cost options: a_b = 1 on head samples, c_b = kappa on
    tail samples (the scale kappa cancels in the ascent's unit())."""
    tail = torch.tensor([float(counts[int(v)] < eta) for v in y], dtype=x.dtype)
    unified_cost(model, opt, x, y, 1 - tail, kappa * tail, **options)


def focalsam_cost(model, opt, x, y, counts, gamma, lam, **options):
    """Focal-SAM composed (spec "Focal-SAM composed"): a_b = 1 - c_y, c_y = lam (1 - pi_y)^gamma."""
    total = sum(counts)
    c = torch.tensor([lam * (1 - counts[int(v)] / total) ** gamma for v in y], dtype=x.dtype)
    unified_cost(model, opt, x, y, 1 - c, c, **options)


def fsam_cost(model, opt, x, y, sigma, lam, every):
    """F-SAM ascending every K steps: fresh steps are F-SAM's (m moves) and store u = unit(d);
    the others perturb by rho(t) u and leave m alone."""
    state = ref_state(opt)
    if not _fresh(state, every, "every_K", 0):
        params = params_of(opt)
        with At(params, [opt.param_groups[0]["rho"] * u for u in state["u"]]):
            g_adv = grad_of(ce(model(x), y).mean(), params)
        finish(opt, g_adv)
        state["t"] += 1
        return
    params = params_of(opt)
    g = grad_of(ce(model(x), y).mean(), params)
    m_old = state.get("m")
    d = g if m_old is None else [p - sigma * q for p, q in zip(g, m_old)]
    state["m"] = g if m_old is None else [lam * q + (1 - lam) * p for p, q in zip(g, m_old)]
    n = global_norm(d)
    state["u"] = [v / (n + 1e-12) for v in d]
    with At(params, [opt.param_groups[0]["rho"] * u for u in state["u"]]):
        g_adv = grad_of(ce(model(x), y).mean(), params)
    finish(opt, g_adv)
    state["t"] += 1
