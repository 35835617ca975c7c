"""Small models, batches and method settings shared by the optimizer tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

COUNTS = [300, 60, 15, 4]  # ImbSAM (eta 20): tail = {2, 3}; SSE-SAM (eta 100): tail = {1, 2, 3}
NUM_CLASSES = len(COUNTS)


class ConvNet(nn.Module):
    """A small conv net with BatchNorm and a linear head."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(16, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


class MLP(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
        self.head = nn.Linear(12, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


MODELS = {"conv": ConvNet, "mlp": MLP}
BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 1e-2}),
}


def make_model(kind: str, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind]().to(dtype)


def batches(
    kind: str,
    n: int,
    batch: int = 24,
    seed: int = 1,
    dtype=torch.float64,
    labels: list[int] | None = None,
):
    """n batches of random inputs; labels drawn so every class shows up now and then."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1, 6, 6) if kind == "conv" else (batch, 6)
    out = []
    for _ in range(n):
        x = torch.randn(shape, generator=g, dtype=dtype)
        if labels is None:
            y = torch.multinomial(
                torch.tensor([0.4, 0.3, 0.2, 0.1]), batch, replacement=True, generator=g
            )
        else:
            y = torch.tensor(labels[:batch])
        out.append((x, y))
    return out


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def assert_same_model(a: nn.Module, b: nn.Module, atol: float = 1e-10, rtol: float = 1e-8) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=rtol, msg=key)


# ---- the efficient variants: settings and reference steps, merged into test_optim_reference.METHODS
# and test_optim_contract.SETTINGS. name -> (samkit name, kwargs, reference step(model, opt, x, y, t)).
def _efficient_methods() -> dict:
    import reference as ref

    return {
        "msam": ("msam", {"rho": 0.5}, lambda m, o, x, y, t: ref.msam(m, o, x, y)),
        "ksam": (
            "ksam",
            {"rho": 0.1, "fraction": 0.25},
            lambda m, o, x, y, t: ref.ksam(m, o, x, y, k=len(y) // 4, subset=False),
        ),
        "bsam": (
            "bsam",
            {"rho_max": 0.1, "rho_min": 0.05},
            lambda m, o, x, y, t: ref.bsam(m, o, x, y),
        ),
        "gsam": (
            "gsam",
            {"rho": 0.1, "rho_min": 0.02, "alpha": 0.3, "lr_max": 0.2, "lr_min": 0.0},
            lambda m, o, x, y, t: ref.gsam(m, o, x, y, alpha=0.3),
        ),
        "looksam": (
            "looksam",
            {"rho": 0.3, "k": 2, "alpha": 0.7},
            lambda m, o, x, y, t: ref.looksam(m, o, x, y, k=2, alpha=0.7),
        ),
        "fsam": (
            "fsam",
            {"rho": 0.1, "sigma": 1.0, "lam": 0.6},
            lambda m, o, x, y, t: ref.fsam(m, o, x, y, sigma=1.0, lam=0.6),
        ),
    }


EFFICIENT_METHODS = _efficient_methods()
#: the group keys the reference optimizers of these methods read
EFFICIENT_GROUP_KEYS = ("rho_max", "rho_min", "lr_max", "lr_min")
#: methods whose optimizer takes the model (K-SAM: BN statistics from the ranking pass only)
NEEDS_MODEL = {"ksam"}
#: constructor settings for the contract tests (test_optim_contract.SETTINGS)
EFFICIENT_SETTINGS = {name: dict(kwargs) for name, (_, kwargs, _) in EFFICIENT_METHODS.items()}


# ---- the cost options (ascent every K steps, ascent on a sub-batch): name -> (samkit name, kwargs,
# reference step), as above. COST_METHODS keep one global ascent (reuse of the last direction), so
# they join test_optim_reference.METHODS and every scale and distributed test; SUBSET_METHODS draw
# their sub-batch per process, and are tested in test_optim_cost.py (and per process under DDP).
def _cost_methods() -> tuple[dict, dict]:
    import reference as ref

    focal = {"rho": 0.1, "class_counts": COUNTS, "gamma": 2.0, "lam": 0.8}
    imb = {"rho": 0.1, "class_counts": COUNTS, "kappa": 2.0}

    def focal_ref(**options):
        return lambda m, o, x, y, t: ref.focalsam_cost(m, o, x, y, COUNTS, 2.0, 0.8, **options)

    def imb_ref(**options):
        return lambda m, o, x, y, t: ref.imbsam_cost(m, o, x, y, COUNTS, kappa=2.0, **options)

    def sam_ref(**options):
        return lambda m, o, x, y, t: ref.sam_cost(m, o, x, y, **options)

    every = {
        "sam-every3": ("sam", {"rho": 0.1, "ascent_every": 3}, sam_ref(every=3)),
        "focalsam-every2": ("focalsam", {**focal, "ascent_every": 2}, focal_ref(every=2)),
        "imbsam-every3-base": (
            "imbsam",
            {**imb, "ascent_every": 3, "ascent_between": "base"},
            imb_ref(every=3, between="base"),
        ),
        "fsam-every2": (
            "fsam",
            {"rho": 0.1, "sigma": 1.0, "lam": 0.6, "ascent_every": 2},
            lambda m, o, x, y, t: ref.fsam_cost(m, o, x, y, sigma=1.0, lam=0.6, every=2),
        ),
    }
    subset = {
        "sam-random-half": ("sam", {"rho": 0.1, "ascent_subset": 0.5}, sam_ref(subset=0.5)),
        "sam-topk": (
            "sam",
            {"rho": 0.1, "ascent_subset": 8, "ascent_subset_mode": "topk"},
            sam_ref(subset=8, mode="topk"),
        ),
        "sam-bernoulli-random": (
            "sam",
            {"rho": 0.1, "ascent_every": 2, "ascent_schedule": "bernoulli", "ascent_subset": 6},
            sam_ref(every=2, schedule="bernoulli", subset=6),
        ),
        "imbsam-topk-graph": (
            "imbsam",
            {
                **imb,
                "ascent_subset": 3,
                "ascent_subset_mode": "topk",
                "ascent_subset_pass": "graph",
            },
            imb_ref(subset=3, mode="topk", graph=True),
        ),
        "imbsam-random": ("imbsam", {**imb, "ascent_subset": 2}, imb_ref(subset=2)),
        "focalsam-random-graph": (
            "focalsam",
            {**focal, "ascent_subset": 5, "ascent_subset_pass": "graph"},
            focal_ref(subset=5, graph=True),
        ),
        "focalsam-every3-topk": (
            "focalsam",
            {**focal, "ascent_every": 3, "ascent_subset": 0.25, "ascent_subset_mode": "topk"},
            focal_ref(every=3, subset=0.25, mode="topk"),
        ),
    }
    return every, subset


COST_METHODS, SUBSET_METHODS = _cost_methods()
