import torch
from torch import nn

from fastgen.ops.batch_norm_act import batch_norm_act, recomputed_outputs  # noqa: F401 (fastgen.nn's)
from fastgen.ref.batch_norm_act import ACTIVATIONS


class BatchNormAct2d(nn.Module):
    """``nn.BatchNorm2d`` followed by ``nn.ReLU`` or ``nn.LeakyReLU`` as one op (fastgen.ops.batch_norm_act),
    forward and backward, keeping one activation-sized tensor for the backward where the pair keeps two (the
    output for leaky_relu, which the next layer keeps anyway; the input for relu, whose output cannot be
    inverted: run the network under ``fastgen.nn.recomputed_outputs()`` and the next layer keeps no copy of
    the output either, it is recomputed from the input in the backward).

    The arguments, defaults, parameters, buffers and state_dict are BatchNorm2d's (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``; ``affine``, ``track_running_stats``,
    ``momentum=None`` for the cumulative average), so a checkpoint of BatchNorm2d + activation loads into it and
    back. Training mode normalises with the batch's statistics (biased variance) and updates the running ones
    (unbiased variance); evaluation mode uses the running statistics. ``activation``: 'relu' or 'leaky_relu'
    (``negative_slope`` > 0). ``backend``: force one backend (see ``fastgen.backends()``).

    It is not a subclass of BatchNorm2d on purpose: code that finds BatchNorm2d layers and replaces or reads
    them as plain normalisations (``nn.SyncBatchNorm.convert_sync_batchnorm``, fastgen.sample's compiler)
    would drop the activation. Double backward (gradient penalties) is an error: use the pair there.
    """

    _version = 2  # BatchNorm's state_dict version (num_batches_tracked)

    def __init__(self, num_features, activation="relu", negative_slope=0.2, eps=1e-5, momentum=0.1, *, affine=True,
                 track_running_stats=True, backend=None, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"BatchNormAct2d: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if activation == "leaky_relu" and not negative_slope > 0:
            raise ValueError(f"BatchNormAct2d: leaky_relu's negative_slope must be > 0 (it is inverted in the "
                             f"backward; 0 is activation='relu'), got {negative_slope!r}")
        factory = dict(device=device, dtype=dtype)
        self.num_features = num_features
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.backend = backend
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, input):
        # BatchNorm's rule: the factor of the running average, and which statistics normalise
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return batch_norm_act(input, self.running_mean if keep else None, self.running_var if keep else None,
                              self.weight, self.bias, batch_stats, factor, self.eps, activation=self.activation,
                              negative_slope=self.negative_slope, backend=self.backend)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)  # checkpoints from before the counter
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @classmethod
    def from_modules(cls, bn, act, *, backend=None):
        """The fused layer of ``bn`` (an ``nn.BatchNorm2d``) followed by ``act`` (``nn.ReLU`` or
        ``nn.LeakyReLU`` with a slope >= 0; a slope of 0 is relu), holding bn's own parameter and buffer
        tensors (not copies: an optimizer over bn's parameters trains the new layer) and bn's training mode."""
        if not isinstance(bn, nn.BatchNorm2d) or isinstance(bn, nn.SyncBatchNorm):
            raise TypeError(f"BatchNormAct2d.from_modules: bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
        if isinstance(act, nn.ReLU):
            activation, slope = "relu", 0.2
        elif isinstance(act, nn.LeakyReLU):
            if not act.negative_slope >= 0:
                raise ValueError(f"BatchNormAct2d.from_modules: a LeakyReLU with a negative slope "
                                 f"({act.negative_slope}) is not invertible; the fused layer takes slopes >= 0")
            activation, slope = ("relu", 0.2) if act.negative_slope == 0 else ("leaky_relu", act.negative_slope)
        else:
            raise TypeError(f"BatchNormAct2d.from_modules: act must be an nn.ReLU or nn.LeakyReLU, got "
                            f"{type(act).__name__}")
        layer = cls(bn.num_features, activation, slope, bn.eps, bn.momentum, affine=bn.affine,
                    track_running_stats=bn.track_running_stats, backend=backend, device="meta")
        for name in ("weight", "bias"):
            setattr(layer, name, getattr(bn, name))  # the same Parameter objects (or None)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            layer._buffers[name] = getattr(bn, name)  # the same tensors (or None)
        layer.train(bn.training)
        return layer

    def to_modules(self):
        """``nn.Sequential(nn.BatchNorm2d, nn.ReLU | nn.LeakyReLU)`` on this layer's own parameter and buffer
        tensors and in its training mode: the unfused pair (double backward, or a baseline to measure against)."""
        bn = nn.BatchNorm2d(self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats,
                            device="meta")
        for name in ("weight", "bias"):
            setattr(bn, name, getattr(self, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            bn._buffers[name] = getattr(self, name)
        act = nn.ReLU() if self.activation == "relu" else nn.LeakyReLU(self.negative_slope)
        return nn.Sequential(bn, act).train(self.training)

    def extra_repr(self):
        act = self.activation + (f"({self.negative_slope})" if self.activation == "leaky_relu" else "")
        return (f"{self.num_features}, {act}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")
