import torch
from torch import nn

from fastgen.ops.masked_conv import check_layer_args, masked_conv2d
from fastgen.ref.masked_conv import causal_mask


class MaskedConv2d(nn.Conv2d):
    """Drop-in masked convolution of PixelCNN: an ``nn.Conv2d`` (same arguments,
    defaults, ``weight``/``bias`` parameters and state_dict keys) whose output at
    a pixel sees only earlier pixels in raster order, computing only those taps.

    ``mask_type``: 'A' hides the centre pixel (first layer), 'B' shows it.
    ``data_channels``: colour channels of the data (3 for RGB). Input and output
    channels are split into that many contiguous blocks; at the centre tap,
    output block g sees input blocks < g (mask A) or <= g (mask B).
    ``backend``: force one backend (see ``fastgen.backends()``); default: dispatch.

    Also takes the common form ``MaskedConv2d('A', in_channels, out_channels, k, ...)``
    (the mask type first; given there and as ``mask_type=`` too, the two must agree).
    A state_dict with the extra ``mask`` buffer of mask-buffer implementations
    loads; a stored mask that disagrees with this layer's is an error.
    """

    def __init__(self, *args, mask_type=None, data_channels=1, backend=None, **kwargs):
        if args and isinstance(args[0], str):
            if mask_type is not None and mask_type != args[0]:
                raise TypeError(f"MaskedConv2d: the mask type is given twice and the two disagree: {args[0]!r} (the "
                                f"first argument) and mask_type={mask_type!r}; give it once")
            mask_type, args = args[0], args[1:]
        mask_type = "B" if mask_type is None else mask_type
        super().__init__(*args, **kwargs)
        check_layer_args(self.in_channels, self.out_channels, self.kernel_size, mask_type, data_channels,
                         self.stride, self.groups, self.padding_mode)
        self.mask_type = mask_type
        self.data_channels = data_channels
        self.backend = backend
        self._register_load_state_dict_pre_hook(self._drop_mask_buffer)

    def forward(self, input):
        return masked_conv2d(input, self.weight, self.bias, self.padding, self.dilation, mask_type=self.mask_type,
                             data_channels=self.data_channels, backend=self.backend)

    def mask(self):
        """The [out, in, kh, kw] 0/1 mask this layer applies."""
        return causal_mask(self.out_channels, self.in_channels, self.kernel_size, self.mask_type,
                           self.data_channels, self.weight.device, self.weight.dtype)

    def _drop_mask_buffer(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs):
        stored = state_dict.pop(prefix + "mask", None)
        if stored is None:
            return
        mine = self.mask().to(torch.float64)
        stored = stored.detach().to(torch.float64)
        if stored.shape != mine.shape and stored.dim() == 4 and stored.shape[:2] == (1, 1):
            stored = stored.expand_as(mine)  # masks stored as [1, 1, kh, kw]
        if stored.shape != mine.shape or not torch.equal(stored != 0, mine != 0):
            error_msgs.append(f"{prefix}mask: the stored mask differs from this layer's mask (mask_type="
                              f"{self.mask_type!r}, data_channels={self.data_channels}); build the layer with the "
                              f"mask_type and data_channels the checkpoint was trained with")

    def extra_repr(self):
        return super().extra_repr() + f", mask_type={self.mask_type!r}, data_channels={self.data_channels}"
