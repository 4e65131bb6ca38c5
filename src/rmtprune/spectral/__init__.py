"""The random-matrix math of rmtprune (numpy only).

MP law, Tracy-Widom, the BEMA fit (standard model), heavy-tailed noise models (Student-t resampled
nulls, BEMA's Gamma model), the KS gate calibrated by size, WeightWatcher's heavy-tailed ESD metrics,
and the rank rules.
"""

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
from .esd_metrics import (
    ESDMetrics,
    PowerLawFit,
    TrapReport,
    correlation_traps,
    esd_metrics,
    hill_alpha,
    powerlaw_fit,
    summarize,
)
from .gate import gate_message, gate_threshold, ks_pvalue, ks_threshold
from .gmp import gmp_edge, gmp_tw_scale, whitened_noise_edge
from .heavy import NOISE_MODELS, TailTest, fit_gamma, fit_matrix, fit_resample, tail_test
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
    "NOISE_MODELS",
    "TailTest",
    "tail_test",
    "fit_gamma",
    "fit_resample",
    "fit_matrix",
    "ks_threshold",
    "ks_pvalue",
    "gate_threshold",
    "gate_message",
    "ESDMetrics",
    "PowerLawFit",
    "TrapReport",
    "esd_metrics",
    "powerlaw_fit",
    "hill_alpha",
    "correlation_traps",
    "summarize",
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
