"""One small random model per accepted architecture family, built with spandrel's own
classes (hyperparameters small enough for CPU tests; spandrel detects them from the keys)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def _esrgan():
    from spandrel.architectures.ESRGAN import ESRGAN

    return ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2)


def _compact():
    from spandrel.architectures.Compact import Compact

    return Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4)


def _span():
    from spandrel.architectures.SPAN import SPAN

    return SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2)


def _swinir():
    from spandrel.architectures.SwinIR import SwinIR

    return SwinIR(embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2,
                  upsampler="pixelshuffle", img_size=16, mlp_ratio=2.0)


def _hat():
    from spandrel.architectures.HAT import HAT

    return HAT(embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2, img_size=16,
               num_feat=8, squeeze_factor=4, compress_ratio=2, mlp_ratio=2.0)


def _dat():
    from spandrel.architectures.DAT import DAT

    return DAT(embed_dim=16, depth=[1], num_heads=[2], split_size=[2, 4], upscale=2,
               img_size=16, expansion_factor=2.0)


def _omnisr():
    from spandrel.architectures.OmniSR import OmniSR

    return OmniSR(num_feat=8, block_num=1, window_size=4, res_num=1, up_scale=2)


def _plksr():
    from spandrel.architectures.PLKSR import PLKSR

    return PLKSR(dim=8, n_blocks=1, upscaling_factor=2, kernel_size=5)


def _realcugan():
    from spandrel.architectures.RealCUGAN import UpCunet2x

    return UpCunet2x(in_channels=3, out_channels=3)


def _scunet():
    from spandrel.architectures.SCUNet import SCUNet

    return SCUNet(config=[1, 1, 1, 1, 1, 1, 1], dim=64)


def _restoreformer():
    from spandrel.architectures.RestoreFormer import RestoreFormer

    # GroupNorm(32) sets the narrowest width; one level per halving down to 16 px.
    return RestoreFormer(n_embed=16, embed_dim=32, ch=32, ch_mult=(1, 1, 1, 1, 1, 1),
                         num_res_blocks=1, z_channels=32, head_size=1)


def _gfpgan():
    from spandrel.architectures.GFPGAN import GFPGAN

    # spandrel detects GFPGAN only at the official widths (86 M parameters)
    return GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2,
                  decoder_load_path=None, fix_decoder=False, num_mlp=8, input_is_latent=True,
                  different_w=True, narrow=1, sft_half=True)


FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "ESRGAN": _esrgan, "Compact": _compact, "SPAN": _span, "SwinIR": _swinir, "HAT": _hat,
    "DAT": _dat, "OmniSR": _omnisr, "PLKSR": _plksr, "RealCUGAN": _realcugan,
    "SCUNet": _scunet, "RestoreFormer": _restoreformer, "GFPGAN": _gfpgan,
}
SLOW = {"GFPGAN"}  # full width: seconds per 512 px face on a CPU core


def model_name(arch: str) -> str:
    return f"t-{arch.lower()}"


def write_state(arch: str, folder: Path, seed: int = 0) -> Path:
    """The family's random state dict as a file, wrapped as trainers save it."""
    torch.manual_seed(seed)
    net = FAMILIES[arch]()
    if arch == "SwinIR":  # a safetensors file, the format desktop tools prefer
        from safetensors.torch import save_file

        path = folder / f"{arch}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
        return path
    path = folder / f"{arch}.pth"
    torch.save({"params_ema": net.state_dict()}, path)
    return path
