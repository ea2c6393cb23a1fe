"""Argument checks shared by the public entry points. Each runs before any kernel and raises TypeError (wrong
kind or dtype) or ValueError (wrong shape, device or value) naming the argument and what was expected."""

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name, t, *, floating=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got {t.dtype}")
    return t


def same_device(name, t, ref_name, ref):
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on the same device")


def shape(name, t, expected, why=""):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}{why}, got {tuple(t.shape)}")


def non_negative(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    # Comparisons rather than math.isfinite: under torch.compile(dynamic=True) the value may be symbolic.
    if not (0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")
    return float(value)


def finite(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (-math.inf < value < math.inf):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)
