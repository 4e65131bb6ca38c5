"""The random-matrix math of rmtprune: MP law, Tracy-Widom, BEMA fit, rank rules (numpy only)."""

from .bema import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_KS_MAX,
    MIN_P,
    SpectrumFit,
    check_shape,
    fit_bulk,
    fit_censored,
)
from .gmp import gmp_edge, gmp_tw_scale, whitened_noise_edge
from .mp import MarchenkoPastur, mp_cdf, mp_pdf, mp_ppf, mp_support
from .rules import (
    RULES,
    BemaRule,
    EnergyRule,
    FixedRule,
    GavishDonohoRule,
    RankDecision,
    RankRule,
    RuleParam,
    gavish_donoho_lambda_star,
    gavish_donoho_omega,
    get_rule,
    make_rule,
    register_rule,
)
from .tracy_widom import tw1_quantile

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_KS_MAX",
    "MIN_P",
    "MarchenkoPastur",
    "mp_pdf",
    "mp_cdf",
    "mp_ppf",
    "mp_support",
    "tw1_quantile",
    "gmp_edge",
    "gmp_tw_scale",
    "whitened_noise_edge",
    "SpectrumFit",
    "fit_bulk",
    "fit_censored",
    "check_shape",
    "RankDecision",
    "RankRule",
    "BemaRule",
    "GavishDonohoRule",
    "EnergyRule",
    "FixedRule",
    "RuleParam",
    "RULES",
    "register_rule",
    "get_rule",
    "make_rule",
    "gavish_donoho_omega",
    "gavish_donoho_lambda_star",
]
