"""Shared by the BLIP-2 LLM tests: re-draw a tiny model's weights like the LAVIS fixtures do."""
import torch


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that outputs depend on the image and greedy choices are not near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
