"""Model parts from the neural-ODE paper: continuous-depth blocks, continuous normalizing
flows and latent ODEs for irregularly sampled time series."""

from .cnf import CNF, CNFResult, ConcatSquashLinear, ConcatSquashMLP, standard_normal_logprob
from .latent import ODERNN, LatentODE, RNNBaseline, SolverConfig, extrapolate, interpolate
from .odeblock import ConcatConv2d, ConcatLinear, ConvODEFunc, NFECounter, ODEBlock
from .planar import PlanarCNF, PlanarFlow, planar_cnf_params, planar_flow_params
from .regularizers import (
    JacobianFrobenius,
    KineticEnergy,
    Regularizer,
    parse_regularizers,
    regularization_loss,
)
from .timeseries import (
    IrregularBatch,
    TimeSeries,
    collate,
    load_real_series,
    make_spirals,
    make_windows,
)
from .toy2d import TOY_DATASETS, sample_toy

__all__ = [
    "ODEBlock", "NFECounter", "ConcatConv2d", "ConcatLinear", "ConvODEFunc",
    "CNF", "CNFResult", "ConcatSquashLinear", "ConcatSquashMLP", "standard_normal_logprob",
    "Regularizer", "KineticEnergy", "JacobianFrobenius", "parse_regularizers",
    "regularization_loss", "PlanarFlow", "PlanarCNF", "planar_flow_params", "planar_cnf_params",
    "TOY_DATASETS", "sample_toy",
    "ODERNN", "LatentODE", "RNNBaseline", "SolverConfig", "extrapolate", "interpolate",
    "TimeSeries", "IrregularBatch", "collate", "make_spirals", "load_real_series", "make_windows",
]
