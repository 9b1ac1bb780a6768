"""The PixelCNN++ family: ``pixelcnnpp``, the discretized logistic mixture over 256 levels (no other data);
loss = NLL through fastgen.discretized_mix_logistic_nll; evaluation and samples.png as the other pixel models
(cached multi-scale sampling)."""
import dataclasses
from typing import Optional

from fastgen.models import PixelCNNpp
from fastgen.train import pixel
from fastgen.train.common import TrainError, check_at_least


# a small network for CPUs (the paper's CIFAR-10 model is --channels 160 --nr-resnet 5 --nr-mix 10 --dropout 0.5)
DEFAULTS = {"channels": 32, "depth": 2, "conditional": False, "nr_mix": 5, "dropout": 0.1}


@dataclasses.dataclass
class PixelCNNppOptions:
    depth: Optional[int] = None  # nr_resnet: gated ResNet blocks per scale
    conditional: Optional[bool] = None
    nr_mix: Optional[int] = None  # logistic mixture components
    dropout: Optional[float] = None  # dropout in the gated ResNet blocks


class PixelCNNppFamily(pixel.PixelFamily):
    """PixelCNN++: the pixel family's loss, evaluation and samples with its own model config and options."""
    MODELS = {"pixelcnnpp": PixelCNNpp}
    Options = PixelCNNppOptions
    defaults = DEFAULTS
    arguments = (pixel.DEPTH, pixel.CONDITIONAL,
                 (("--nr-mix",), dict(type=int, help=f"logistic mixture components (default {DEFAULTS['nr_mix']}; "
                                                        f"the paper's is 10)")),
                 (("--dropout",), dict(type=float, help=f"dropout in the gated ResNet blocks (default "
                                                        f"{DEFAULTS['dropout']:g}; the paper's is 0.5)")))
    description = (f"--channels / --filters: nr_filters (default {DEFAULTS['channels']}); --layers / --nr-resnet: "
                   f"gated ResNet blocks per scale (nr_resnet, default {DEFAULTS['depth']}; the paper's is 5); "
                   f"--conditional")
    fixed_on_resume = ("depth", "conditional", "nr_mix", "dropout")

    @classmethod
    def check_options(cls, opts):
        check_at_least(opts, ("depth", "nr_mix"), 1)
        if opts.dropout is not None and not 0 <= opts.dropout < 1:
            raise TrainError(f"dropout must be in [0, 1), got {opts.dropout}")

    @classmethod
    def channel_multiple(cls, name, data_channels):
        return 1, ""

    def new_config(self, data):
        if data.levels != 256:
            kind = "binary" if data.levels == 2 else f"{data.levels} levels"
            raise TrainError(f"pixelcnnpp models 256-level images (its discretized logistic mixture has 256 bins), "
                             f"but {self.cfg.data!r} has {data.levels} levels: for {kind} data train pixelcnn or "
                             f"gated-pixelcnn (a {'Bernoulli' if data.levels == 2 else 'categorical'} likelihood)"
                             + (", or use --data mnist (its 256 grey levels)" if data.levels == 2 else ""))
        opts = self.opts
        kwargs = {"image_shape": list(data.shape), "nr_resnet": opts.depth, "nr_filters": self.cfg.channels,
                  "nr_logistic_mix": opts.nr_mix, "dropout": opts.dropout,
                  "num_classes": data.num_classes if opts.conditional else None}
        return {"name": self.cfg.model, "kwargs": kwargs}

    def describe_model(self):
        model = self.model
        classes = f", {model.num_classes} classes" if model.num_classes else ""
        return (f"{self.cfg.model}, nr_resnet={model.nr_resnet}, filters={model.nr_filters}, "
                f"{model.nr_mix}-component discretized logistic mixture, dropout={self.opts.dropout:g}{classes}")
