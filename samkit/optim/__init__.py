"""samkit's optimizers: SAM and its variants behind one step API, and a registry to pick one by name.

opt = samkit.optim.FocalSAM(model.parameters(), class_counts=counts, lr=0.1, momentum=0.9)
loss, logits = opt.step(lambda: model(x), y)
"""

from samkit.optim.bisam import BiSAM, lower_bound
from samkit.optim.bsam import BSAM
from samkit.optim.ccsam import CCSAM
from samkit.optim.core import SharpnessAware, StepOutput, per_sample_cross_entropy
from samkit.optim.crsam import CRSAM
from samkit.optim.focalsam import FocalSAM
from samkit.optim.fsam import FriendlySAM
from samkit.optim.gsam import GSAM
from samkit.optim.imbsam import ImbSAM
from samkit.optim.ksam import KSAM
from samkit.optim.looksam import LookSAM
from samkit.optim.msam import MSAM
from samkit.optim.plain import Plain
from samkit.optim.registry import available, create, get, register
from samkit.optim.sam import ASAM, SAM
from samkit.optim.ssesam import SSESAM

__all__ = [
    "ASAM",
    "BSAM",
    "BiSAM",
    "CCSAM",
    "CRSAM",
    "FocalSAM",
    "FriendlySAM",
    "GSAM",
    "ImbSAM",
    "KSAM",
    "LookSAM",
    "MSAM",
    "Plain",
    "SAM",
    "SSESAM",
    "SharpnessAware",
    "StepOutput",
    "available",
    "create",
    "get",
    "lower_bound",
    "per_sample_cross_entropy",
    "register",
]
