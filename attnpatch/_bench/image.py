"""Image-level comparison of ``attnpatch bench --model PATH`` (sparse suite): PSNR and SSIM of
a generated image against the dense one, in torch (no extra dependency).

Both take images with values in [0, 1], shaped (C, H, W) or (N, C, H, W) (RGB: C = 3).
"""

from __future__ import annotations

import math

import torch

from .._errors import AttnPatchError

#: SSIM constants of Wang et al. 2004 for a dynamic range L = 1: C1 = (0.01 L)², C2 = (0.03 L)²
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _batched(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise AttnPatchError(f"{name}: expected an image (C, H, W) or a batch (N, C, H, W), got "
                         f"shape {tuple(x.shape)}")
    return x.double()


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB, 10·log10(1 / MSE) for images in [0, 1]; ``inf`` for
    identical images."""
    a, b = _batched(image, "image"), _batched(reference, "reference")
    if a.shape != b.shape:
        raise AttnPatchError(f"psnr: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 2-D Gaussian window (size x size), float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004) for images in [0, 1]: an 11x11 Gaussian window (σ = 1.5),
    C1 = 0.01², C2 = 0.03², local statistics over the 'valid' window positions (no padding),
    computed on each colour channel separately and averaged over channels and positions (the
    mean over RGB, not luminance). 1 for identical images."""
    a, b = _batched(image, "image"), _batched(reference, "reference")
    if a.shape != b.shape:
        raise AttnPatchError(f"ssim: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    channels, height, width = a.shape[1:]
    if min(height, width) < SSIM_WINDOW:
        raise AttnPatchError(f"ssim: images of {height}x{width} are smaller than the "
                         f"{SSIM_WINDOW}x{SSIM_WINDOW} window")
    w = gaussian_window().to(a.device)[None, None].expand(channels, 1, -1, -1)

    def filt(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, w, groups=channels)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_a ** 2 + mu_b ** 2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return float((num / den).mean())
